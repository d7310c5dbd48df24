"""The tokenizers tasks are built with: GPT-2's (shipped in ``models/gpt2_tokenizer``, the default) or a
model folder's own, loaded offline; and the checks task builders need.

A ``Tokenizer`` wraps a ``tokenizers.Tokenizer`` with what the builders ask of it: ids of text without
special tokens (and their character spans), a word's ids as it reads mid-sentence, the BOS the model
expects, the pad token, and each token's text for messages. Every check fails with a ``TaskError``
that names the prompt or word and shows what it tokenized to: an answer that is not exactly one
token, a clean/corrupted pair of different lengths.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from ..models import models_dir
from ._task import TaskError

GPT2_VOCAB_SIZE = 50257
END_OF_TEXT = 50256  # <|endoftext|>: GPT-2's BOS/EOS, and the pad token of these tasks
# A sentence and its GPT-2 ids (models/gpt2_tokenizer/README.md): a tokenizer that gives these ids
# and has 50,257 tokens is GPT-2's, whatever folder it was loaded from.
_GPT2_PROBE = "When Mary and John went to the store, John gave a drink to Mary."
_GPT2_PROBE_IDS = (2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284, 5335, 13)
# Words are tokenized as they continue this text: mid-sentence, after a space ("and Mary"), so a
# SentencePiece tokenizer shows "▁Mary" and not the start-of-text form
_WORD_CONTEXT = "and"
# Files a Hugging Face folder keeps its tokenizer in (AutoTokenizer reads the last three kinds)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """Text to token ids for the task builders, with the BOS and pad conventions of its model.

    - ``backend``: the ``tokenizers.Tokenizer`` that does the work (``encode`` never adds special
      tokens; ``prompt`` adds the BOS when the model expects one).
    - ``name``: how messages call it (``"GPT-2"``, or the folder's name).
    - ``bos_id``: the tokenizer's BOS token, if it has one; ``adds_bos``: whether prompts start with
      it (the tokenizer's own template adds it, or ``tokenizer_config.json`` says ``add_bos_token``).
    - ``eos_id``, ``unk_id``, ``pad_token_id``: its other special tokens (``None`` when absent).
    - ``folder``: where it was loaded from (``None`` for the shipped GPT-2 tokenizer).
    """

    backend: object
    name: str
    bos_id: int | None = None
    adds_bos: bool = False
    eos_id: int | None = None
    unk_id: int | None = None
    pad_token_id: int | None = None
    folder: Path | None = None

    def __post_init__(self):
        if self.adds_bos and self.bos_id is None:
            raise TaskError(f"the {self.name} tokenizer is set to add a BOS token but names none (bos_token)")

    # ------------------------------------------------------------------ sizes and special tokens

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are ``0 .. vocab_size - 1``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        """What rows are right-padded with: the pad token, else EOS, else BOS, else 0 (never read)."""
        for token in (self.pad_token_id, self.eos_id, self.bos_id):
            if token is not None:
                return token
        return 0

    @property
    def document_start_id(self) -> int | None:
        """The token that opens a document: the BOS, else the EOS (GPT-2 style ``<|endoftext|>``)."""
        return self.bos_id if self.bos_id is not None else self.eos_id

    @property
    def bos_prefix(self) -> list[int]:
        """What every prompt starts with: ``[bos_id]`` when the model expects a BOS, else nothing."""
        return [self.bos_id] if self.adds_bos else []

    @property
    def model_name(self) -> str | None:
        """The model a task built with this tokenizer is for: its folder when that holds a model."""
        if self.folder is None:
            return "gpt2"
        return str(self.folder) if (self.folder / "config.json").is_file() else None

    @cached_property
    def is_gpt2(self) -> bool:
        """Whether this is GPT-2's vocabulary (the canonical circuits of GPT-2 small then apply)."""
        return self.vocab_size == GPT2_VOCAB_SIZE and tuple(self.encode(_GPT2_PROBE)) == _GPT2_PROBE_IDS

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's character span ``(start, end)`` in it."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(span) for span in enc.offsets]

    def prompt(self, text: str) -> list[int]:
        """``text`` as the model reads it: the BOS when it expects one, then ``encode(text)``."""
        return self.bos_prefix + self.encode(text)

    def continuation(self, prefix: str, text: str) -> list[int] | None:
        """The ids ``text`` adds after ``prefix``; ``None`` when a token spans the boundary."""
        head, whole = self.encode(prefix), self.encode(prefix + text)
        return whole[len(head) :] if whole[: len(head)] == head else None

    def word_ids(self, word: str) -> list[int] | None:
        """``word``'s ids as it reads mid-sentence: ``" Mary"`` after a word (``None``: it merges)."""
        return self.continuation(_WORD_CONTEXT, word)

    def single_token_or_none(self, word: str) -> int | None:
        """The id of ``word`` (with its leading space) if it is one known token mid-sentence."""
        ids = self.word_ids(word)
        if ids is None or len(ids) != 1 or ids[0] == self.unk_id:
            return None
        return ids[0]

    def single_token(self, word: str, *, what: str = "answer") -> int:
        """The id of ``word`` if it is exactly one token mid-sentence (include its space: ``" Mary"``)."""
        token = self.single_token_or_none(word)
        if token is None:
            raise TaskError(f"{what} {word!r} is not a single {self.name} token: {self.describe_word(word)}")
        return token

    def single_token_words(self, words, *, shown: int = 4) -> tuple[tuple[str, ...], str]:
        """The ``words`` that are one token each after a space mid-sentence (``" Mary"``), and for
        messages how the first ``shown`` of the others tokenize."""
        kept = tuple(word for word in words if self.single_token_or_none(" " + word) is not None)
        dropped = [word for word in words if word not in kept]
        return kept, "; ".join(f"' {word}': {self.describe_word(' ' + word)}" for word in dropped[:shown])

    def describe_word(self, word: str) -> str:
        """How ``word`` tokenizes mid-sentence, for messages."""
        ids = self.word_ids(word)
        if ids is None:
            return f"it merges with the word before it ({self.shown(self.encode(_WORD_CONTEXT + word))})"
        if len(ids) == 1 and ids[0] == self.unk_id:
            return f"it is the unknown token {self.shown(ids)}"
        return f"it tokenizes to {len(ids)} tokens {self.shown(ids)}"

    def encode_pair(
        self, clean: str, corrupt: str, *, row: int, start: Sequence[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """Ids of a clean prompt and its corrupted version, of equal lengths, after ``start``
        (default ``bos_prefix``)."""
        start = self.bos_prefix if start is None else list(start)
        clean_ids, corrupt_ids = start + self.encode(clean), start + self.encode(corrupt)
        if len(clean_ids) != len(corrupt_ids):
            raise TaskError(
                f"prompt {row}: the clean prompt {clean!r} has {len(clean_ids)} tokens but the corrupted prompt "
                f"{corrupt!r} has {len(corrupt_ids)}; they must pair up position by position.\n"
                f"  clean:     {self.token_strings(clean_ids)}\n  corrupted: {self.token_strings(corrupt_ids)}"
            )
        return clean_ids, corrupt_ids

    # ------------------------------------------------------------------ decoding, for messages

    @cached_property
    def _context_ids(self) -> tuple[list[int], str]:
        ids = self.encode(_WORD_CONTEXT)
        return ids, self.backend.decode(ids, skip_special_tokens=False)

    def token_text(self, token: int | np.integer) -> str:
        """One token's text as it reads mid-sentence (``" Mary"``, also for SentencePiece's ``"▁Mary"``).

        Decoders drop the space of a text's first token, so the token is decoded after a word and
        that word's text removed.
        """
        ids, head = self._context_ids
        text = self.backend.decode(ids + [int(token)], skip_special_tokens=False)
        return text[len(head) :] if text.startswith(head) else self.backend.decode([int(token)], skip_special_tokens=False)

    def token_strings(self, ids: Sequence[int | np.integer] | np.ndarray) -> list[str]:
        """Each token's text on its own (``" Mary"``), for messages and tests."""
        return [self.token_text(int(i)) for i in ids]

    def shown(self, ids: Sequence[int]) -> str:
        return f"{list(ids)} {self.token_strings(ids)}"

    def describe(self) -> str:
        bos = f"BOS {self.token_text(self.bos_id)!r} first" if self.adds_bos else "no BOS"
        where = f" from {self.folder}" if self.folder is not None else ""
        return f"{self.name} tokenizer{where} ({self.vocab_size:,} tokens, {bos})"


# ------------------------------------------------------------------------------------------------
# Loading


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer, loaded once from ``models/gpt2_tokenizer``, without the network."""
    from transformers import GPT2TokenizerFast

    folder = models_dir() / "gpt2_tokenizer"
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        raise TaskError(f"the GPT-2 tokenizer files are missing from {folder}; set ACDC_JAX_MODELS to the models/ folder")
    hf = GPT2TokenizerFast.from_pretrained(str(folder))
    # transformers 5 builds an empty tokenizer instead of failing on some argument mistakes
    if len(hf) != GPT2_VOCAB_SIZE:
        raise TaskError(f"the tokenizer loaded from {folder} has {len(hf)} tokens, not GPT-2's {GPT2_VOCAB_SIZE}")
    return Tokenizer(backend=hf.backend_tokenizer, name="GPT-2", bos_id=END_OF_TEXT, eos_id=END_OF_TEXT, unk_id=END_OF_TEXT)


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def _special(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskError(f"cannot read {file}: {err}") from None
    return data if isinstance(data, dict) else {}


def _template_prefix(backend) -> list[int]:
    """The ids the tokenizer's own template puts before a text (Llama's BOS)."""
    probe = "Hello world"
    bare = list(backend.encode(probe, add_special_tokens=False).ids)
    full = list(backend.encode(probe, add_special_tokens=True).ids)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def _transformers_tokenizer(folder: Path):
    """``AutoTokenizer`` on a folder without ``tokenizer.json`` (SentencePiece's ``tokenizer.model``, or
    ``vocab.json`` + ``merges.txt``), offline."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - missing sentencepiece, a bad file, an unknown class
        first = f"{type(err).__name__}: {err}"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # old GPT-2 folders have no tokenizer_config.json, which transformers 5's AutoTokenizer needs to name
        # the class; these two files are byte-level BPE
        try:
            return GPT2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except Exception:  # noqa: BLE001
            pass
    raise TaskError(f"transformers cannot load the tokenizer in {folder}: {first}")


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in a Hugging Face folder, loaded offline.

    ``tokenizer.json`` is read as it is with the ``tokenizers`` library, with the special tokens
    named in ``tokenizer_config.json`` / ``special_tokens_map.json``; without it,
    ``AutoTokenizer.from_pretrained(folder, local_files_only=True)`` reads ``tokenizer.model``
    (SentencePiece) or ``vocab.json`` + ``merges.txt``. Prompts start with a BOS when the
    tokenizer's template adds one (Llama, Mistral, Gemma), unless ``tokenizer_config.json`` sets
    ``add_bos_token``, which decides.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskError(f"no tokenizer folder at {folder}")
    if not has_tokenizer_files(folder):
        raise TaskError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    config = _read_json(folder / "special_tokens_map.json") | _read_json(folder / "tokenizer_config.json")
    names = {key: _special(config, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - the library raises plain Exceptions on bad files
            raise TaskError(f"cannot read {folder / 'tokenizer.json'}: {err}") from None
        ids = {key: None if name is None else backend.token_to_id(name) for key, name in names.items()}
        for key, name in names.items():
            if name is not None and ids[key] is None:
                raise TaskError(f"tokenizer_config.json in {folder} names {key} {name!r}, which tokenizer.json does not have")
        model_unk = getattr(backend.model, "unk_token", None)
        if ids["unk_token"] is None and isinstance(model_unk, str):
            ids["unk_token"] = backend.token_to_id(model_unk)
    else:
        hf = _transformers_tokenizer(folder)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise TaskError(f"the tokenizer in {folder} has no fast (tokenizers) version; save it with a tokenizer.json")
        ids = {key: getattr(hf, key + "_id", None) for key in names}
    prefix = _template_prefix(backend)
    bos_id = ids["bos_token"]
    if len(prefix) > 1 or (prefix and bos_id is not None and prefix != [bos_id]):
        raise TaskError(
            f"the tokenizer in {folder} puts {prefix} before every text; the task builders handle one BOS token "
            "(bos_token in tokenizer_config.json)"
        )
    if prefix and bos_id is None:
        bos_id = prefix[0]
    adds_bos = config["add_bos_token"] if isinstance(config.get("add_bos_token"), bool) else bool(prefix)
    return Tokenizer(
        backend=backend,
        name=folder.name,
        bos_id=bos_id,
        adds_bos=adds_bos,
        eos_id=ids["eos_token"],
        unk_id=ids["unk_token"],
        pad_token_id=ids["pad_token"],
        folder=folder,
    )


def tokenizer_for_model(folder: str | os.PathLike, d_vocab: int) -> tuple[Tokenizer, str | None]:
    """The tokenizer to build text tasks with for the model in ``folder`` (``d_vocab`` embedding rows).

    Its own tokenizer when the folder has one; GPT-2's when it has none and the model has GPT-2's
    vocabulary size (the note returned says so); a ``TaskError`` otherwise, and when the tokenizer
    has more tokens than the model has embeddings.
    """
    folder = Path(folder)
    if has_tokenizer_files(folder):
        tokenizer, note = load_tokenizer(folder), None
    elif d_vocab == GPT2_VOCAB_SIZE:
        tokenizer = gpt2_tokenizer()
        note = f"{folder} has no tokenizer files; using GPT-2's shipped tokenizer (the model has GPT-2's {GPT2_VOCAB_SIZE:,}-token vocabulary)"
    else:
        raise TaskError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) and the model's vocabulary ({d_vocab:,} tokens) is "
            f"not GPT-2's ({GPT2_VOCAB_SIZE:,}), so its prompts cannot be tokenized: save the model's tokenizer there "
            "(AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)), or bring a task of token ids (a task JSON file)"
        )
    if tokenizer.vocab_size > d_vocab:
        raise TaskError(
            f"the {tokenizer.describe()} has {tokenizer.vocab_size:,} tokens but the model embeds only {d_vocab:,} "
            "(its vocab_size): the tokenizer does not belong to this model"
        )
    return tokenizer, note


# ------------------------------------------------------------------------------------------------
# GPT-2 shortcuts (the default tokenizer) and helpers that need no tokenizer


def encode(text: str) -> list[int]:
    """GPT-2 token ids of ``text`` (no BOS is added)."""
    return gpt2_tokenizer().encode(text)


def encode_with_offsets(text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """GPT-2 token ids of ``text`` and each token's character span ``(start, end)`` in it."""
    return gpt2_tokenizer().encode_with_offsets(text)


def token_strings(ids: Sequence[int | np.integer] | np.ndarray) -> list[str]:
    """Each GPT-2 token decoded on its own (``" Mary"``), for messages and tests."""
    return gpt2_tokenizer().token_strings(ids)


def single_token(word: str, *, what: str = "answer") -> int:
    """The GPT-2 id of ``word`` if it is exactly one token (include its leading space: ``" Mary"``)."""
    return gpt2_tokenizer().single_token(word, what=what)


def encode_pair(clean: str, corrupt: str, *, row: int) -> tuple[list[int], list[int]]:
    """GPT-2 token ids of a clean prompt and its corrupted version, which must have the same length."""
    return gpt2_tokenizer().encode_pair(clean, corrupt, row=row)


def token_at(offsets: Sequence[tuple[int, int]], char_index: int) -> int:
    """Index of the token whose span covers character ``char_index``."""
    for i, (start, end) in enumerate(offsets):
        if start <= char_index < end:
            return i
    raise TaskError(f"no token covers character {char_index} (spans {list(offsets)[:3]}...)")


def right_pad(rows: Sequence[Sequence[int]], pad: int = END_OF_TEXT) -> np.ndarray:
    """Rows of different lengths as one ``[batch, max_len]`` int array, padded on the right.

    With a causal model, right padding leaves every real position unchanged.
    """
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out

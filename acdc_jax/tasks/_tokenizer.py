"""GPT-2's tokenizer, loaded offline from ``models/gpt2_tokenizer``, and the checks task builders need.

Every check fails with a ``TaskError`` that names the prompt or word and shows what it tokenized
to: an answer that is not exactly one token, a clean/corrupted pair of different lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from ..models import models_dir
from ._task import TaskError

GPT2_VOCAB_SIZE = 50257
END_OF_TEXT = 50256  # <|endoftext|>: GPT-2's BOS/EOS, and the pad token of these tasks


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """The GPT-2 tokenizer (a ``transformers`` fast tokenizer), loaded once, without the network."""
    from transformers import GPT2TokenizerFast

    folder = models_dir() / "gpt2_tokenizer"
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        raise TaskError(f"the GPT-2 tokenizer files are missing from {folder}; set ACDC_JAX_MODELS to the models/ folder")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    # transformers 5 builds an empty tokenizer instead of failing on some argument mistakes
    if len(tokenizer) != GPT2_VOCAB_SIZE:
        raise TaskError(f"the tokenizer loaded from {folder} has {len(tokenizer)} tokens, not GPT-2's {GPT2_VOCAB_SIZE}")
    return tokenizer


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (no BOS is added)."""
    return list(gpt2_tokenizer()(text, add_special_tokens=False)["input_ids"])


def encode_with_offsets(text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's character span ``(start, end)`` in it."""
    enc = gpt2_tokenizer()(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]


def token_strings(ids: Sequence[int | np.integer] | np.ndarray) -> list[str]:
    """Each token decoded on its own (``" Mary"``), for messages and tests."""
    tokenizer = gpt2_tokenizer()
    return [tokenizer.decode([int(i)]) for i in ids]


def token_at(offsets: Sequence[tuple[int, int]], char_index: int) -> int:
    """Index of the token whose span covers character ``char_index``."""
    for i, (start, end) in enumerate(offsets):
        if start <= char_index < end:
            return i
    raise TaskError(f"no token covers character {char_index} (spans {list(offsets)[:3]}...)")


def _shown(ids: Sequence[int]) -> str:
    return f"{list(ids)} {token_strings(ids)}"


def single_token(word: str, *, what: str = "answer") -> int:
    """The id of ``word`` if it is exactly one token (include its leading space: ``" Mary"``)."""
    ids = encode(word)
    if len(ids) != 1:
        raise TaskError(f"{what} {word!r} is not a single GPT-2 token: it tokenizes to {len(ids)} tokens {_shown(ids)}")
    return ids[0]


def encode_pair(clean: str, corrupt: str, *, row: int) -> tuple[list[int], list[int]]:
    """Token ids of a clean prompt and its corrupted version, which must have the same length."""
    clean_ids, corrupt_ids = encode(clean), encode(corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise TaskError(
            f"prompt {row}: the clean prompt {clean!r} has {len(clean_ids)} tokens but the corrupted prompt "
            f"{corrupt!r} has {len(corrupt_ids)}; they must pair up position by position.\n"
            f"  clean:     {token_strings(clean_ids)}\n  corrupted: {token_strings(corrupt_ids)}"
        )
    return clean_ids, corrupt_ids


def right_pad(rows: Sequence[Sequence[int]], pad: int = END_OF_TEXT) -> np.ndarray:
    """Rows of different lengths as one ``[batch, max_len]`` int array, padded on the right.

    With a causal model, right padding leaves every real position unchanged.
    """
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out

"""Tasks built with a model folder's own tokenizer: single-token names and years, BOS, alignment, the CLI.

No tokenizer can be downloaded here, so the tokenizers are built in code with the ``tokenizers`` library:
a word-level one in SentencePiece style ("▁Mary", a BOS added by its template) saved next to a tiny
random Llama, and a BPE trained on IOI sentences (rare names split into pieces, digits one per token, as
Llama 2's do).
"""

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from typer.testing import CliRunner

from acdc_jax.cli import app
from acdc_jax.graph import Graph
from acdc_jax.models import load_model, models_dir
from acdc_jax.tasks import TaskError, gpt2_tokenizer, load_tokenizer, tokenizer_for_model
from acdc_jax.tasks import greaterthan as gt
from acdc_jax.tasks import ioi
from acdc_jax.tasks.docstring import docstring_task
from acdc_jax.tasks.greaterthan import greater_than_task
from acdc_jax.tasks.ioi import ioi_task, single_token_names

SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
WORD_NAMES = ioi.NAMES[:40]  # the word-level vocabulary's names; the other 59 are unknown words
EXTRA_ROWS = 3  # the Llama's embedding has more rows than the tokenizer has tokens, as Pythia's does


def flat(text: str) -> str:
    return " ".join(text.split())


def template_words() -> set[str]:
    words = set()
    for template in ioi.BABA_TEMPLATES + tuple(gt.TEMPLATES.values()):
        words |= set(template.replace(",", " ").replace(".", " ").split())
    return {w for w in words if not w.startswith(("[", "{"))} | set(ioi.PLACES) | set(ioi.OBJECTS)


def save_tokenizer(tokenizer: Tokenizer, folder, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def word_level(folder, names=WORD_NAMES, numbers: str = "pairs") -> Tokenizer:
    """SentencePiece-style words ("▁Mary"), punctuation apart, and numbers in two-digit pieces
    (" 1289" -> "▁12", "89") or, with ``numbers="chunks"``, in pieces of up to three digits from the left
    (" 1289" -> "▁", "128", "9"), as Llama 3 splits them."""
    words = template_words() | set(names) | set(gt.NOUNS[:20])
    pieces = SPECIAL + [",", "."] + sorted("▁" + w for w in words)
    if numbers == "pairs":
        pieces += [f"▁{c}" for c in gt.CENTURIES] + [f"{i:02d}" for i in range(100)]
        digits = r"▁?\d\d|[.,]"
    else:
        pieces += ["▁"] + sorted({str(i) for i in range(1000)} | {f"{i:02d}" for i in range(100)})
        digits = r"\d{1,3}|▁|[.,]"
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Split(Regex(digits), behavior="isolated"),
    ])  # fmt: skip
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    save_tokenizer(tokenizer, folder, tokenizer_class="PreTrainedTokenizerFast")
    return tokenizer


def trained_bpe(folder) -> Tokenizer:
    """A BPE trained on IOI sentences with 30 names, the later ones rarer: frequent names become one
    token, rare and unseen ones stay in pieces. Digits are one token each."""
    rng = random.Random(0)
    names = ioi.NAMES[:30]
    weights = [1.0 / (1 + i) ** 1.5 for i in range(len(names))]
    sentences = []
    for _ in range(300):
        a, b = rng.choices(names, weights, k=2)
        template = rng.choice(ioi.BABA_TEMPLATES).replace("[PLACE]", rng.choice(ioi.PLACES))
        sentences.append(template.replace("[OBJECT]", rng.choice(ioi.OBJECTS)).replace("[A]", a).replace("[B]", b))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), pre_tokenizers.Digits(individual_digits=True),
    ])  # fmt: skip
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(ioi.NAMES + gt.NOUNS + ioi.BABA_TEMPLATES) + "0123456789"))
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(sentences, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    save_tokenizer(tokenizer, folder)
    return tokenizer


def save_llama(folder, vocab_size: int) -> None:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama with the word-level tokenizer in its folder."""
    folder = tmp_path_factory.mktemp("llama")
    words = word_level(folder)
    save_llama(folder, words.get_vocab_size() + EXTRA_ROWS)
    return folder


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    trained_bpe(folder)
    return folder


def task_digest(task) -> str:
    """A hash of everything a task's prompts, answers and labels hold."""
    h = hashlib.sha256()
    for field in ("clean", "corrupt", "positions", "answers", "wrong_answers", "answer_mask", "wrong_mask"):
        x = getattr(task, field)
        h.update(field.encode())
        if x is not None:
            x = np.ascontiguousarray(x)
            h.update(str(x.dtype).encode())
            h.update(str(x.shape).encode())
            h.update(x.tobytes())
    for k in sorted(task.labels):
        h.update(k.encode())
        h.update(np.ascontiguousarray(task.labels[k]).tobytes())
    h.update(json.dumps(task.prompts).encode())
    return h.hexdigest()[:16]


# Computed with the builders as they were before they took a tokenizer (commit d6d0120).
GPT2_DIGESTS = {
    "ioi": (lambda **kw: ioi_task(**kw), "736404622e4ef748"),
    "ioi-mixed": (lambda **kw: ioi_task(40, prompt_type="mixed", n_templates=None, seed=2, **kw), "c4bbf5102000518a"),
    "ioi-pairs": (lambda **kw: ioi_task(8, pairs=True, prompt_type="mixed", n_templates=6, seed=1, **kw), "bad5464abbcefad2"),
    "greater-than": (lambda **kw: greater_than_task(**kw), "a328bfc95d94cea0"),
    "greater-than-paper-test": (lambda **kw: greater_than_task(20, template="paper", split="test", seed=3, **kw), "75ff3c708bcb4120"),
    "docstring": (lambda **kw: docstring_task(20, **kw), "ecbb0bb246e106a2"),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ GPT-2 is unchanged


@pytest.mark.parametrize("case", sorted(GPT2_DIGESTS))
def test_gpt2_tasks_are_byte_identical_to_before(case):
    make, digest = GPT2_DIGESTS[case]
    task = make()
    assert task_digest(task) == digest
    assert task_digest(make(tokenizer=gpt2_tokenizer())) == digest
    assert task.canonical is not None and task.model == "gpt2"


def test_a_gpt2_folder_without_tokenizer_json_loads_as_gpt2_and_builds_the_same_ioi(tmp_path):
    for name in ("vocab.json", "merges.txt"):  # no tokenizer_config.json: AutoTokenizer alone would fail
        shutil.copy(models_dir() / "gpt2_tokenizer" / name, tmp_path / name)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.is_gpt2 and not tokenizer.adds_bos and tokenizer.pad_id == 50256
    task = ioi_task(8, prompt_type="mixed", n_templates=None, tokenizer=tokenizer)
    default = ioi_task(8, prompt_type="mixed", n_templates=None)
    for field in ("clean", "corrupt", "answers", "wrong_answers"):
        np.testing.assert_array_equal(getattr(task, field), getattr(default, field))
    assert task.canonical is not None  # GPT-2's vocabulary: GPT-2 small's circuit applies


# ------------------------------------------------------------------------------------------ the tokenizers


def test_word_level_tokenizer_reads_names_mid_sentence_and_adds_its_bos(llama_folder):
    tokenizer = load_tokenizer(llama_folder)
    assert tokenizer.adds_bos and tokenizer.bos_id == 1 and tokenizer.unk_id == 0 and tokenizer.pad_id == 2
    assert not tokenizer.is_gpt2
    michael = tokenizer.backend.token_to_id("▁Michael")
    assert tokenizer.single_token(" Michael") == michael and tokenizer.token_text(michael) == " Michael"
    ids = tokenizer.backend.token_to_id
    assert tokenizer.prompt("Then, Michael") == [1, ids("▁Then"), ids(","), michael]
    with pytest.raises(TaskError, match=r"IO name ' Zebediah' is not a single llama\w* token: it is the unknown token \[0\]"):
        tokenizer.single_token(" Zebediah", what="IO name")


def test_clean_and_corrupted_prompts_that_cannot_pair_up_are_named_with_their_tokens(bpe_folder):
    tokenizer = load_tokenizer(bpe_folder)
    with pytest.raises(TaskError, match=r"(?s)prompt 3: the clean prompt 'Then, Michael left' has \d+ tokens but the corrupted "
                       r"prompt 'Then, Zebediah left' has \d+;.*clean: +\['<s>', ' Then,', ' Michael'"):
        tokenizer.encode_pair("Then, Michael left", "Then, Zebediah left", row=3)


# ------------------------------------------------------------------------------------------ IOI


@pytest.mark.parametrize("which", ["word-level", "bpe"])
def test_ioi_with_a_folder_tokenizer_uses_single_token_names_and_its_bos(which, llama_folder, bpe_folder):
    folder = llama_folder if which == "word-level" else bpe_folder
    tokenizer = load_tokenizer(folder)
    kept = single_token_names(tokenizer)
    if which == "word-level":
        assert kept == WORD_NAMES  # the unknown names are dropped
    else:
        trained = ioi.NAMES[:30]
        assert 10 <= len(kept) < len(trained) and set(kept) <= set(trained)
        split = [name for name in trained if name not in kept]
        assert all(len(tokenizer.word_ids(" " + name)) > 1 for name in split)  # rare names came out in pieces
    task = ioi_task(16, prompt_type="mixed", n_templates=None, seed=1, tokenizer=tokenizer)
    rows = np.arange(task.n_prompts)
    lab = task.labels
    assert task.clean.shape == task.corrupt.shape
    np.testing.assert_array_equal(task.clean[:, 0], tokenizer.bos_id)  # BOS first, in both runs
    np.testing.assert_array_equal(task.corrupt[:, 0], tokenizer.bos_id)
    assert np.all(lab["IO"] >= 1) and np.all(lab["S1"] >= 1)  # the labels count the BOS
    names = {" " + name for name in kept}
    for r in rows:
        io, s = task.answers[r, 0], task.wrong_answers[r, 0]
        assert {tokenizer.token_text(io), tokenizer.token_text(s)} <= names and io != s
        assert task.clean[r, lab["IO"][r]] == io and task.clean[r, lab["S1"][r]] == s == task.clean[r, lab["S2"][r]]
        end = lab["END"][r]
        # the same length clean and corrupted: padding starts at the same place
        assert np.all(task.clean[r, end + 1 :] == tokenizer.pad_id) and np.all(task.corrupt[r, end + 1 :] == tokenizer.pad_id)
        assert tokenizer.pad_id not in task.corrupt[r, : end + 1]
        changed = set(np.flatnonzero(task.clean[r] != task.corrupt[r]).tolist())
        slots = {lab["IO"][r], lab["S1"][r], lab["S2"][r]}
        assert changed <= slots and all(tokenizer.token_text(task.corrupt[r, p]) in names for p in slots)
        # the answer is the token that continues the prompt into the full sentence
        assert tokenizer.continuation(task.prompts[r], tokenizer.token_text(io)) == [io]
    assert task.canonical is None  # GPT-2 small's circuit means nothing for this vocabulary
    assert task.model == (str(folder) if which == "word-level" else None)  # the BPE folder holds no model


def test_too_few_single_token_names_is_a_clear_error(tmp_path):
    word_level(tmp_path, names=ioi.NAMES[:5])
    with pytest.raises(TaskError, match=r"IOI needs at least 10 names that are single tokens .* but only 5 of the IOI paper's 99 "
                       r"are: Michael, Christopher, Jessica, Matthew, Ashley. For example ' Jennifer': it is the unknown token"):
        ioi_task(4, tokenizer=load_tokenizer(tmp_path))


# ------------------------------------------------------------------------------------------ Greater-Than


def test_greater_than_with_a_folder_tokenizer(llama_folder):
    tokenizer = load_tokenizer(llama_folder)
    task = greater_than_task(12, tokenizer=tokenizer)
    year_ids = gt.year_token_ids(tokenizer)
    assert [tokenizer.token_text(t) for t in year_ids] == [f"{i:02d}" for i in range(100)]
    # every year splits as " XX" + "YY" here; ACDC's rule keeps XX02..XX98 but the first and last
    assert gt.years(tokenizer) == tuple(str(y) for c in gt.CENTURIES for y in range(c * 100 + 3, c * 100 + 98))
    rows = np.arange(task.n_prompts)
    lab = task.labels
    np.testing.assert_array_equal(task.clean[:, 0], tokenizer.bos_id)
    assert lab["NOUN"][0] == 2 and lab["YY"][0] == 8 and lab["END"][0] == task.seq_len - 1  # BOS, "The", noun
    yy = np.array([int(p.split()[-3][2:]) for p in task.prompts])
    np.testing.assert_array_equal(task.clean[rows, lab["YY"]], np.asarray(year_ids)[yy])
    np.testing.assert_array_equal(task.clean[rows, lab["XX1"]], task.clean[rows, lab["END"]])  # " XX" again at the end
    assert all(tokenizer.token_text(task.clean[r, lab["NOUN"][r]]) == " " + task.prompts[r].split()[1] for r in rows)
    changed = task.clean != task.corrupt
    assert np.all(changed.sum(1) == 1) and np.all(task.corrupt[rows, lab["YY"]] == year_ids[1])
    assert task.answer_mask.shape == (12, tokenizer.vocab_size)
    np.testing.assert_array_equal(task.answer_mask.sum(1), 99 - yy)
    # the model has more outputs than the tokenizer has tokens: the masks are fitted to them
    model = load_model(llama_folder)
    assert model.config.d_vocab_out == tokenizer.vocab_size + EXTRA_ROWS
    inputs = task.metric_inputs(model)
    assert inputs.answer_mask.shape == (12, model.config.d_vocab_out) and not inputs.answer_mask[:, -EXTRA_ROWS:].any()
    assert np.isfinite(float(task.get_metric()(inputs.clean_logits, inputs)))


def test_greater_than_refuses_tokenizers_that_split_numbers_per_digit_or_in_chunks_of_three(bpe_folder, tmp_path):
    with pytest.raises(TaskError, match=r"Greater-Than needs years that tokenize as ' XX' \+ 'YY'.* It splits ' 1289' into "
                       r"\[' ', '1', '2', '8', '9'\] \(one token per digit.*cannot be posed with this tokenizer"):
        greater_than_task(4, tokenizer=load_tokenizer(bpe_folder))
    word_level(tmp_path, numbers="chunks")
    with pytest.raises(TaskError, match=r"splits no year of 1100-1799 so\. It splits ' 1289' into \[' ', '128', '9'\] "
                       r"\(numbers in chunks of up to three digits"):
        greater_than_task(4, tokenizer=load_tokenizer(tmp_path))


def test_docstring_with_a_tokenizer_that_lacks_its_words_is_a_clear_error(llama_folder):
    with pytest.raises(TaskError, match=r"Docstring draws 15 distinct variable names per prompt.* only \d of ACDC's 111 are single tokens"):
        docstring_task(2, tokenizer=load_tokenizer(llama_folder))


# ------------------------------------------------------------------------------------------ the CLI


def test_discover_on_a_llama_folder_tokenizes_with_its_tokenizer_and_writes_the_circuit(llama_folder, tmp_path):
    out = tmp_path / "circuit.json"
    result = CliRunner().invoke(app, [
        "discover", "--model", str(llama_folder), "--task", "ioi", "--task-option", "n_prompts=4", "--method", "acdc",
        "--threshold", "0.01", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"prompts tokenized with the {llama_folder.name} tokenizer" in flat(result.output)
    assert "BOS '<s>' first" in flat(result.output)
    data = json.loads(out.read_text())
    model = load_model(llama_folder)
    assert data["task"] == "ioi" and data["method"] == "acdc"
    assert data["n_edges_total"] == Graph.from_model(model.config).n_gates == len(data["edges"])


@pytest.fixture(scope="module")
def misfits(llama_folder, tmp_path_factory):
    """The Llama without its tokenizer files, and a Llama with fewer embeddings than its tokenizer has tokens."""
    bare = tmp_path_factory.mktemp("no-tokenizer")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_folder / name, bare / name)
    small = tmp_path_factory.mktemp("small")
    n_tokens = word_level(small).get_vocab_size()
    save_llama(small, n_tokens - 10)
    return bare, small, n_tokens


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(misfits):
    bare, small, n_tokens = misfits
    runner = CliRunner()
    args = ["--task", "ioi", "--method", "acdc", "--threshold", "0.01"]
    result = runner.invoke(app, ["discover", "--model", str(bare), *args])
    assert result.exit_code == 2, result.output
    assert "has no tokenizer files" in flat(result.output) and "is not GPT-2's" in flat(result.output)
    result = runner.invoke(app, ["discover", "--model", str(small), *args])
    assert result.exit_code == 2, result.output
    assert f"has {n_tokens} tokens but the model embeds only {n_tokens - 10}" in flat(result.output)
    # a GPT-2-vocabulary model without tokenizer files falls back to GPT-2's, and says so
    tokenizer, note = tokenizer_for_model(bare, 50257)
    assert tokenizer is gpt2_tokenizer() and "using GPT-2's shipped tokenizer" in note


def test_experiments_tokenize_with_the_models_tokenizer_too(misfits):
    from experiments._runner import run_experiment

    bare, small, n_tokens = misfits
    with pytest.raises(SystemExit, match=f"has {n_tokens} tokens but the model embeds only {n_tokens - 10}"):
        run_experiment("greater-than", model=str(small), small=True, echo=lambda *_: None)

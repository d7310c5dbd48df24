"""IOI, Greater-Than and Docstring: ACDC's data word for word, labels, canonical circuits, metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax.graph import Graph
from acdc_jax.models import TransformerConfig, build_model, expected_shapes, forward
from acdc_jax.tasks import TaskError, get_task
from acdc_jax.tasks import docstring as docstring_module
from acdc_jax.tasks import greaterthan as gt_module
from acdc_jax.tasks import ioi as ioi_module
from acdc_jax.tasks.docstring import docstring_task as docstring
from acdc_jax.tasks.greaterthan import greater_than_task as greater_than
from acdc_jax.tasks.ioi import ioi_task as ioi
from acdc_jax.tasks._tokenizer import (
    END_OF_TEXT,
    encode,
    encode_pair,
    gpt2_tokenizer,
    single_token,
    token_strings,
)

GPT2_SMALL = TransformerConfig.gpt2(n_ctx=64)

# Prompts printed by ACDC's own code (commit bc99ace8: IOIDataset(prompt_type="ABBA", N=200,
# nb_templates=1, seed=0) and its ABC flips; docstring_induction_prompt_generator with the
# settings of get_all_docstring_things), run once with this tokenizer.
ACDC_IOI = [
    ("Then, Mary and Jeffrey went to the restaurant. Jeffrey gave a bone to Mary",
     "Then, Melissa and Nicole went to the restaurant. Anthony gave a bone to Melissa"),
    ("Then, Brittany and Jamie went to the garden. Jamie gave a necklace to Brittany",
     "Then, Lauren and Alicia went to the garden. Daniel gave a necklace to Lauren"),
    ("Then, Christine and Amy went to the station. Amy gave a drink to Christine",
     "Then, Thomas and Elizabeth went to the station. Jesse gave a drink to Thomas"),
    ("Then, Jonathan and Adam went to the garden. Adam gave a bone to Jonathan",
     "Then, Kelly and Nathan went to the garden. Travis gave a bone to Kelly"),
]  # fmt: skip
ACDC_DOCSTRING_0 = (
    '\ndef old(self, first, files, page, names, size, read):\n    """sector gap population\n\n'
    "    :param page: message tree\n    :param names: detail mine\n    :param"
)
ACDC_DOCSTRING_0_CORRUPT = (
    '\ndef old(self, first, files, project, target, new, read):\n    """sector gap population\n\n'
    "    :param image: message tree\n    :param update: detail mine\n    :param"
)
ACDC_DOCSTRING_0_WRONG = [
    " instance", " project", " target", " new", " image", " update", " required", " run", " page", " names", " first",
    " files", " read",
]  # fmt: skip
# ACDC's Greater-Than draw (torch.manual_seed(54), 200 prompts): its first three prompts
ACDC_GREATER_THAN = (
    "The demonstrations lasted from the year 1289 to 12",
    "The assaults lasted from the year 1537 to 15",
    "The affair lasted from the year 1282 to 12",
)


def assert_same_task(a, b):
    for field in ("clean", "corrupt", "positions", "answers", "wrong_answers", "answer_mask", "wrong_mask"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=field)
    assert a.labels.keys() == b.labels.keys()
    for k in a.labels:
        np.testing.assert_array_equal(a.labels[k], b.labels[k], err_msg=k)


def differs(a, b) -> bool:
    return a.clean.shape != b.clean.shape or not np.array_equal(a.clean, b.clean)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_gpt2():
    assert len(gpt2_tokenizer()) == 50257
    assert encode(" Mary") == [5335]
    assert encode("When Mary and John went to the store")[:5] == [2215, 5335, 290, 1757, 1816]


def test_single_token_rejects_a_split_word_and_says_how_it_split():
    assert single_token(" John") == 1757
    with pytest.raises(TaskError, match=r"IO name ' Zebediah' is not a single GPT-2 token: it tokenizes to 4 tokens .* \[' Z', 'eb', 'edia', 'h'\]"):
        single_token(" Zebediah", what="IO name")


def test_encode_pair_rejects_different_lengths():
    ids, other = encode_pair("Then, Mary left", "Then, John left", row=0)
    assert len(ids) == len(other)
    with pytest.raises(TaskError, match=r"prompt 3: the clean prompt .* has 4 tokens but the corrupted prompt .* has 7;"):
        encode_pair("Then, Mary left", "Then, Zebediah left", row=3)


# ------------------------------------------------------------------------------------------ IOI


def test_ioi_defaults_are_acdcs_prompts_word_for_word():
    task = ioi(n_prompts=2)
    test = ioi(n_prompts=2, split="test")  # ACDC draws 2N prompts; the test split is the second half
    assert task.clean.shape == (2, 15) and test.clean.shape == (2, 15)
    for i, (clean, corrupt) in enumerate(ACDC_IOI):
        t, row = (task, i) if i < 2 else (test, i - 2)
        assert t.prompts[row] == clean.rsplit(" ", 1)[0]
        np.testing.assert_array_equal(t.clean[row], encode(clean)[:-1])
        np.testing.assert_array_equal(t.corrupt[row], encode(corrupt)[:-1])
        assert token_strings(t.answers[row]) == [" " + clean.rsplit(" ", 1)[1]]


def test_ioi_is_deterministic_given_seed_and_size():
    a, b, c = ioi(n_prompts=6, seed=3), ioi(n_prompts=6, seed=3), ioi(n_prompts=6, seed=4)
    assert_same_task(a, b)
    assert a.prompts == b.prompts
    assert differs(a, c) and a.prompts != c.prompts


@pytest.mark.parametrize(
    "options",
    [dict(), dict(prompt_type="BABA", n_templates=None), dict(prompt_type="mixed", n_templates=None, seed=2)],
    ids=["acdc", "baba-15", "mixed-14"],
)
def test_ioi_labels_point_at_the_names(options):
    task = ioi(n_prompts=12, **options)
    names = {" " + n for n in ioi_module.NAMES}
    rows = np.arange(task.n_prompts)
    io, s = task.answers[:, 0], task.wrong_answers[:, 0]
    lab = task.labels
    np.testing.assert_array_equal(task.clean[rows, lab["IO"]], io)
    np.testing.assert_array_equal(task.clean[rows, lab["S1"]], s)
    np.testing.assert_array_equal(task.clean[rows, lab["S2"]], s)
    np.testing.assert_array_equal(lab["S1+1"], lab["S1"] + 1)
    assert np.all(lab["S1"] < lab["S2"]) and np.all(lab["S2"] < lab["END"])
    np.testing.assert_array_equal(task.positions[:, 0], lab["END"])
    for r in rows:
        assert {token_strings([io[r]])[0], token_strings([s[r]])[0]} <= names and io[r] != s[r]
        end = lab["END"][r]
        # right padding only, at the same places in clean and corrupted rows
        assert np.all(task.clean[r, end + 1 :] == END_OF_TEXT) and np.all(task.corrupt[r, end + 1 :] == END_OF_TEXT)
        assert END_OF_TEXT not in task.clean[r, : end + 1] and END_OF_TEXT not in task.corrupt[r, : end + 1]
        assert task.prompts[r].endswith(token_strings([task.clean[r, end]])[0])
        # the ABC prompt differs from the clean one only at the three name positions, which hold names
        changed = set(np.flatnonzero(task.clean[r] != task.corrupt[r]).tolist())
        name_slots = {lab["IO"][r], lab["S1"][r], lab["S2"][r]}
        assert changed <= name_slots
        assert all(token_strings([task.corrupt[r, p]])[0] in names for p in name_slots)
        assert task.corrupt[r, lab["IO"][r]] not in (io[r], s[r])  # ACDC's IO flip avoids both names
    if "prompt_type" not in options:
        assert set(token_strings(task.clean[rows, lab["END"]])) == {" to"}


def test_ioi_mixed_prompts_have_both_orders_and_different_lengths():
    task = ioi(n_prompts=40, prompt_type="mixed", n_templates=None, seed=2)
    assert np.any(task.labels["IO"] < task.labels["S1"]) and np.any(task.labels["IO"] > task.labels["S1"])
    assert len(set(task.labels["END"].tolist())) > 1


def test_ioi_pairs_swap_the_two_names():
    task = ioi(n_prompts=8, pairs=True, prompt_type="mixed", n_templates=6, seed=1)
    for i in range(0, 8, 2):
        assert task.answers[i, 0] == task.wrong_answers[i + 1, 0] and task.wrong_answers[i, 0] == task.answers[i + 1, 0]
        for key in task.labels:  # same template: the names sit in the same places
            assert task.labels[key][i] == task.labels[key][i + 1]
        io, s1, s2 = (task.labels[k][i] for k in ("IO", "S1", "S2"))
        a, b = task.clean[i].copy(), task.clean[i + 1].copy()
        a[[io, s1, s2]], b[[io, s1, s2]] = 0, 0
        np.testing.assert_array_equal(a, b)  # nothing else differs
    with pytest.raises(TaskError, match="n_prompts must be even"):
        ioi(n_prompts=3, pairs=True)


def test_ioi_rejects_bad_options():
    with pytest.raises(TaskError, match="prompt_type must be one of"):
        ioi(prompt_type="ABC")
    with pytest.raises(TaskError, match="n_templates"):
        ioi(prompt_type="mixed", n_templates=1)


def test_ioi_canonical_circuit_is_acdcs_1041_edges():
    circuit = ioi_module.canonical_circuit()
    assert len(circuit.edges) == 963 == len(set(circuit.edges))
    qkv = Graph.from_model(GPT2_SMALL)
    internal = Graph.from_model(GPT2_SMALL, internal_edges=True)
    assert len(circuit.gate_names(qkv)) == 963
    with_internal = circuit.gate_names(internal)
    assert len(with_internal) == 1041  # ACDC's count
    inner = with_internal - circuit.gate_names(qkv)
    heads = {f"a{l}.{h}" for group in ioi_module.IOI_HEAD_CLASSES.values() for l, h in group}
    assert len(heads) == 26
    assert inner == {f"{head}.{t}->{head}" for head in heads for t in "qkv"}
    assert len(circuit.gate_names(Graph.from_model(GPT2_SMALL, qkv_split=False))) == 526
    nodes = circuit.gate_names(Graph.from_model(GPT2_SMALL, level="node"))
    assert nodes == heads | {"embed"} | {f"mlp{l}" for l in range(12)}
    edges = set(circuit.edges)
    # class connections: previous token -> induction k, v; s2 inhibition -> name mover q; name movers -> logits
    assert {"a2.2->a5.5.k", "a4.11->a6.9.v", "a7.3->a9.9.q", "a9.9->logits", "embed->a7.3.q", "embed->a0.1.v"} <= edges
    assert not {"a2.2->a5.5.q", "a7.3->a9.9.k", "a7.3->logits", "embed->a7.3.k", "embed->a9.9.q", "a0.0->mlp1"} & edges
    # ACDC's encoding keeps every MLP -> circuit head edge and all MLP wiring
    assert {"mlp3->a9.9.q", "mlp0->a5.5.q", "embed->logits", "mlp11->logits", "a7.3->mlp7"} <= edges


# ------------------------------------------------------------------------------------------ Greater-Than


def test_greater_than_draws_are_torchs():
    torch = pytest.importorskip("torch")
    for seed, n in ((54, 200), (7, 30)):
        torch.random.manual_seed(seed)
        nouns = torch.randint(0, len(gt_module.NOUNS), (n,)).numpy()
        years = torch.randint(0, len(gt_module.years()), (n,)).numpy()
        draws = gt_module.torch_cpu_draws(seed, 2 * n)
        np.testing.assert_array_equal(draws[:n] % len(gt_module.NOUNS), nouns)
        np.testing.assert_array_equal(draws[n:] % len(gt_module.years()), years)


def test_greater_than_data():
    task = greater_than()
    assert task.prompts[:3] == ACDC_GREATER_THAN  # ACDC draws 2 x 100 prompts; other sizes draw others
    assert task.clean.shape == (100, 10)
    year_ids = gt_module.year_token_ids()
    assert year_ids[1] == 486 and len(set(year_ids)) == 100  # "01" is ACDC's corrupting token
    for noun in gt_module.NOUNS:
        single_token(" " + noun, what="noun")
    for year in gt_module.years():
        assert token_strings(encode(" " + year)) == [" " + year[:2], year[2:]]
    assert len(gt_module.years()) > 500 and all("1100" <= y < "1800" for y in gt_module.years())
    rows = np.arange(100)
    yy = np.array([int(p.split()[-3][2:]) for p in task.prompts])
    np.testing.assert_array_equal(task.clean[rows, task.labels["YY"]], np.asarray(year_ids)[yy])
    assert set(token_strings(task.clean[rows, task.labels["END"]])) == set(token_strings(task.clean[rows, task.labels["XX1"]]))
    assert all(token_strings([task.clean[r, 1]])[0] == " " + task.prompts[r].split()[1] for r in rows)
    changed = task.clean != task.corrupt
    assert np.all(changed.sum(1) == 1) and np.all(task.corrupt[:, 7] == 486)
    # masks: the 100 year tokens, split at YY
    assert not np.any(task.answer_mask & task.wrong_mask)
    np.testing.assert_array_equal(np.flatnonzero((task.answer_mask | task.wrong_mask)[0]), np.sort(year_ids))
    np.testing.assert_array_equal(task.answer_mask.sum(1), 99 - yy)
    for r in rows[:3]:
        assert task.answer_mask[r, year_ids[yy[r] + 1]] and task.wrong_mask[r, year_ids[yy[r]]]


def test_greater_than_is_deterministic_and_offers_the_papers_template():
    a, b, c = greater_than(8), greater_than(8), greater_than(8, seed=1)
    assert_same_task(a, b)
    assert differs(a, c)
    paper = greater_than(3, template="paper")
    assert paper.clean.shape == (3, 12) and paper.prompts[0].split()[-3:-1] == ["the", "year"]
    assert_same_task(greater_than(4, split="test"), greater_than(4, split="test"))
    assert differs(greater_than(4, split="test"), greater_than(4))


def test_greater_than_canonical_circuit_is_acdcs_262_edges():
    circuit = gt_module.canonical_circuit()
    assert len(circuit.edges) == 235
    assert len(circuit.gate_names(Graph.from_model(GPT2_SMALL, internal_edges=True))) == 262  # ACDC's count
    assert len(circuit.gate_names(Graph.from_model(GPT2_SMALL, qkv_split=False))) == 145
    heads = {"a0.1", "a0.3", "a0.5", "a5.5", "a6.1", "a6.9", "a7.10", "a8.11", "a9.1"}
    nodes = circuit.gate_names(Graph.from_model(GPT2_SMALL, level="node"))
    assert nodes == heads | {"embed"} | {f"mlp{l}" for l in range(12)}
    edges = set(circuit.edges)
    assert {"a0.1->mlp0", "mlp3->a5.5.k", "a9.1->logits", "a9.1->mlp9", "mlp4->a9.1.q", "mlp0->mlp8", "mlp8->mlp9"} <= edges
    assert not {"mlp4->a9.1.k", "a9.1->mlp8", "embed->a5.5.q", "mlp0->mlp9", "a0.1->logits"} & edges


# ------------------------------------------------------------------------------------------ Docstring


def test_docstring_reproduces_acdcs_prompts():
    task = docstring(n_prompts=3)
    assert task.prompts[0] == ACDC_DOCSTRING_0
    np.testing.assert_array_equal(task.clean[0], [END_OF_TEXT] + encode(ACDC_DOCSTRING_0))
    np.testing.assert_array_equal(task.corrupt[0], [END_OF_TEXT] + encode(ACDC_DOCSTRING_0_CORRUPT))
    assert token_strings(task.answers[0]) == [" size"]
    assert token_strings(task.wrong_answers[0]) == ACDC_DOCSTRING_0_WRONG
    assert task.metric == "logit_diff" and dict(task.metric_options) == {"wrong_reduce": "max"}
    # the test split continues ACDC's seeds
    assert docstring(n_prompts=1, split="test", seed=0).prompts[0] == docstring(n_prompts=2).prompts[1]


def test_docstring_labels_and_answers():
    task = docstring(n_prompts=10, seed=5)
    assert_same_task(task, docstring(n_prompts=10, seed=5))
    assert differs(task, docstring(n_prompts=10, seed=6))
    rows = np.arange(10)
    lab = task.labels
    assert task.wrong_answers.shape == (10, 13)
    for r in rows:
        assert task.answers[r, 0] not in task.wrong_answers[r] and len(set(task.wrong_answers[r].tolist())) == 13
    np.testing.assert_array_equal(task.clean[rows, lab["C_def"]], task.answers[:, 0])
    np.testing.assert_array_equal(task.clean[rows, lab["A_def"]], task.clean[rows, lab["A_doc"]])
    np.testing.assert_array_equal(task.clean[rows, lab["B_def"]], task.clean[rows, lab["B_doc"]])
    assert np.all(lab["A_def"] + 2 == lab["B_def"]) and np.all(lab["C_def"] < lab["A_doc"])
    np.testing.assert_array_equal(task.positions[:, 0], lab["END"])
    assert set(token_strings(task.clean[rows, lab["END"]])) == {"param"}
    assert np.all(lab["END"] == task.seq_len - 1)
    # corrupted: the matching def arguments and the documented parameters are other names
    changed = task.clean != task.corrupt
    for key in ("A_def", "B_def", "C_def", "A_doc", "B_doc"):
        assert np.all(changed[rows, lab[key]]), key
    assert np.all(changed.sum(1) == 5)


def test_docstring_canonical_circuit_is_nodes_only():
    circuit = docstring_module.canonical_circuit()
    assert not circuit.has_edges
    assert circuit.gate_names(Graph.from_model(GPT2_SMALL, level="node")) == set(docstring_module.CANONICAL_NODES)
    with pytest.raises(TaskError, match="only at node level"):
        circuit.gate_names(Graph.from_model(GPT2_SMALL))
    four_layer = Graph(n_layers=4, n_heads=8, has_mlp=False, internal_edges=True)
    assert len(docstring_module.attn_only_4l_circuit().gate_names(four_layer)) == 37  # ACDC's count


# ------------------------------------------------------------------------------------------ registry, metrics


def test_get_task_by_name_and_close_matches():
    assert_same_task(get_task("ioi", n_prompts=2), ioi(n_prompts=2))
    assert get_task("greater-than", n_prompts=2).name == "greater-than"
    with pytest.raises(TaskError, match="did you mean greater-than"):
        get_task("greater_than")
    with pytest.raises(TaskError, match="did you mean .*docstring"):
        get_task("docstrings")


@pytest.fixture(scope="module")
def gpt2_small_random():
    rng = np.random.default_rng(0)
    weights = {
        name: (1.0 if name.endswith(("ln1.w", "ln2.w", "ln_final.w")) else 0.0)
        + 0.02 * rng.standard_normal(shape, dtype=np.float32)
        for name, shape in expected_shapes(GPT2_SMALL).items()
    }
    return build_model(GPT2_SMALL, weights)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ioi(n_prompts=2, prompt_type="mixed", n_templates=None, seed=2),
        lambda: greater_than(n_prompts=2),
        lambda: docstring(n_prompts=2),
    ],
    ids=["ioi-padded", "greater-than", "docstring"],
)
def test_metrics_are_finite_on_a_random_gpt2_small(make, gpt2_small_random):
    task = make()
    inputs = task.metric_inputs(gpt2_small_random)
    corrupt_logits = forward(gpt2_small_random, jnp.asarray(task.corrupt), positions=jnp.asarray(task.positions))
    value = float(task.get_metric()(inputs.clean_logits, inputs))
    patched = float(task.get_metric()(corrupt_logits, inputs))
    kl_clean = float(task.get_metric(task.discovery_metric)(inputs.clean_logits, inputs))
    kl = float(task.get_metric(task.discovery_metric)(corrupt_logits, inputs))
    assert np.isfinite([value, patched, kl]).all()
    assert abs(kl_clean) < 1e-6 and kl > 0

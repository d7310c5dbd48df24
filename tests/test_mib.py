"""MIB's protocol: CPR and CMD on curves computed by hand, MIB's prune (its counts, and that it leaves the
metric as it is under patching), the MIB-style tasks on GPT-2's tokenizer and on one built in code, and the
``acdc-jax mib`` command on a tiny random GPT-2 folder (the submission reads back, the numbers recompute)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from typer.testing import CliRunner

import acdc_jax.evaluate as ev
from acdc_jax import export
from acdc_jax.cli import app
from acdc_jax.graph import Graph
from acdc_jax.methods import Problem, discover
from acdc_jax.models import build_model, expected_shapes, load_model
from acdc_jax.tasks import Task, TaskError, get_task, gpt2_tokenizer, load_tokenizer
from acdc_jax.tasks import ioi, mib

from .conftest import TINY_CONFIGS

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ CPR and CMD by hand


def test_cpr_and_cmd_of_curves_computed_by_hand():
    # three points, trapezoids on paper: widths 0.4 and 0.5
    x = [0.1, 0.5, 1.0]
    assert ev.cpr(x, [0.2, 0.6, 1.0]) == pytest.approx(0.4 * 0.4 + 0.5 * 0.8, abs=1e-15)  # 0.56
    assert ev.cmd(x, [0.2, 0.6, 1.0]) == pytest.approx(0.4 * 0.6 + 0.5 * 0.2, abs=1e-15)  # 0.34
    # f below 0 and above 1: CPR counts the negative part, CMD the trapezoid of |1 - f| at the points
    # (1.5 and 0.5 on the first segment: 0.4 * 1.0; the exact integral of |1 - f| there would be 0.25)
    assert ev.cpr(x, [-0.5, 1.5, 1.0]) == pytest.approx(0.4 * 0.5 + 0.5 * 1.25, abs=1e-15)  # 0.825
    assert ev.cmd(x, [-0.5, 1.5, 1.0]) == pytest.approx(0.4 * 1.0 + 0.5 * 0.25, abs=1e-15)  # 0.525
    # MIB's grid runs from 0.001 to 1 with no point at 0: a flat curve at c has CPR 0.999 c
    assert ev.cpr(ev.MIB_FRACTIONS, [0.5] * 10) == pytest.approx(0.4995, abs=1e-15)
    assert ev.cmd(ev.MIB_FRACTIONS, [0.5] * 10) == pytest.approx(0.4995, abs=1e-15)
    # nothing until 50%, then the full model: CPR only from the last segment, CMD 0.499 + 0.25
    step = [0.0] * 9 + [1.0]
    assert ev.cpr(ev.MIB_FRACTIONS, step) == pytest.approx(0.25, abs=1e-15)
    assert ev.cmd(ev.MIB_FRACTIONS, step) == pytest.approx(0.749, abs=1e-15)
    # a faithful circuit from 1% on that overshoots to 1.2 at 20%
    f = [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.2, 1.0, 1.0]
    widths = np.diff(ev.MIB_FRACTIONS)  # 0.001, 0.003, 0.005, 0.01, 0.03, 0.05, 0.1, 0.3, 0.5
    by_hand_cpr = (0.001 * 0 + 0.003 * 0.25 + 0.005 * 0.75 + 0.01 * 1 + 0.03 * 1 + 0.05 * 1 + 0.1 * 1.1 + 0.3 * 1.1
                   + 0.5 * 1)
    by_hand_cmd = 0.001 * 1 + 0.003 * 0.75 + 0.005 * 0.25 + 0.1 * 0.1 + 0.3 * 0.1
    assert widths == pytest.approx([0.001, 0.003, 0.005, 0.01, 0.03, 0.05, 0.1, 0.3, 0.5], abs=1e-15)
    assert ev.cpr(ev.MIB_FRACTIONS, f) == pytest.approx(by_hand_cpr, abs=1e-15)
    assert ev.cmd(ev.MIB_FRACTIONS, f) == pytest.approx(by_hand_cmd, abs=1e-15)


# ------------------------------------------------------------------ MIB's prune


def test_prune_dangling_drops_what_mib_prunes():
    graph = Graph(n_layers=1, n_heads=1, has_mlp=True)  # embed, a0.0 (q, k, v), mlp0, logits

    def pruned(kept, rounds=1):
        return sorted(np.array(graph.edges)[ev.prune_dangling(graph, np.isin(graph.edges, kept), rounds=rounds)].tolist())

    assert pruned(["a0.0->logits"]) == []  # the head reads nothing kept: it is out, and its edge with it
    assert pruned(["embed->a0.0.v", "a0.0->logits", "embed->mlp0"]) == ["a0.0->logits", "embed->a0.0.v"]  # mlp0 reaches nothing
    assert pruned(["embed->a0.0.q", "a0.0->mlp0", "mlp0->logits"]) == ["a0.0->mlp0", "embed->a0.0.q", "mlp0->logits"]
    assert pruned(["embed->logits"]) == ["embed->logits"]
    assert pruned(list(graph.edges)) == sorted(graph.edges)
    # a chain that dangles twice: mlp0 -> a1.0 -> nothing. One round (the EAP-IG commits MIB pins) drops
    # a1.0's edge in; embed->mlp0 goes only in the second round (EAP-IG since PR #17)
    graph = Graph(n_layers=2, n_heads=1, has_mlp=True)
    chain = ["embed->mlp0", "mlp0->a1.0.q", "embed->logits"]
    assert pruned(chain) == ["embed->logits", "embed->mlp0"]
    assert pruned(chain, rounds=None) == ["embed->logits"]


def _random_model(seed=0):
    cfg = TINY_CONFIGS["gpt2-like"]
    rng = np.random.RandomState(seed)
    weights = {name: (1.0 if name.endswith(".w") and "ln" in name else 0.0) + 0.3 * rng.randn(*shape)
               for name, shape in expected_shapes(cfg).items()}
    return build_model(cfg, weights)


def test_mib_prune_leaves_the_metric_unchanged_under_patching():
    """The claim behind evaluating without MIB's prune: at 1e-10 in float64 on random circuits."""
    with jax.enable_x64(True):
        model = _random_model().astype(jnp.float64)
        cfg, rng = model.config, np.random.RandomState(0)
        task = Task(name="random", clean=rng.randint(0, cfg.d_vocab, (3, 7)), corrupt=rng.randint(0, cfg.d_vocab, (3, 7)),
                    positions=np.full((3, 1), 6), metric="logit_diff", answers=rng.randint(0, cfg.d_vocab, (3, 1)),
                    wrong_answers=rng.randint(0, cfg.d_vocab, (3, 1)))
        problem = Problem.build(model, task, metric="logit_diff", ablation="corrupt")
        n = problem.graph.n_gates
        kept = np.stack([rng.rand(n) < p for p in (0.05, 0.1, 0.2, 0.4)])
        once = np.stack([ev.prune_dangling(problem.graph, k) for k in kept])
        fully = np.stack([ev.prune_dangling(problem.graph, k, rounds=None) for k in kept])
        assert (fully.sum(1) < kept.sum(1)).all() and (fully <= once).all() and (once <= kept).all()
        values = jax.vmap(problem.value)(jnp.asarray(np.concatenate([kept, once, fully]), jnp.float64))
        np.testing.assert_allclose(values[4:8], values[:4], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(values[8:], values[:4], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the tasks


def word_level_tokenizer(folder, *, digits_apart: bool = False) -> None:
    """A SentencePiece-style word-level tokenizer ("▁Mary", a BOS from its template) over the MIB tasks'
    words, letters and the numbers 0-999, saved in ``folder``; ``digits_apart``: numbers one digit per token."""
    text = " ".join(mib.IOI_TEMPLATES + mib.IOI_PLACES + mib.IOI_OBJECTS + ioi.NAMES[:30] + mib.MCQA_COLOURS
                    + tuple(n for n, _, _ in mib.MCQA_OBJECTS) + ("Question What color is are Answer Q How much plus minus A",))
    words = sorted(set(re.findall(r"[A-Za-z]+", text)) | {w.lower() for w in re.findall(r"[A-Za-z]+", text)})
    numbers = [str(i) for i in range(10)] if digits_apart else [str(i) for i in range(1000)]
    pieces = ["<unk>", "<s>", "</s>", "\n", ".", ",", "?", ":", "▁"] + sorted({"▁" + w for w in words + list(mib.LETTERS)} | set(mib.LETTERS))
    pieces += numbers if digits_apart else ["▁" + n for n in numbers]
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
         pre_tokenizers.Split(Regex(r"[.,?:]"), behavior="isolated")]
        + ([pre_tokenizers.Digits(individual_digits=True)] if digits_apart else [])
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("words")
    word_level_tokenizer(folder)
    return {"gpt2": gpt2_tokenizer(), "words": load_tokenizer(folder)}


def _prompt_ids(task, row):
    return task.clean[row, : task.positions[row, 0] + 1]


@pytest.mark.parametrize("which", ["gpt2", "words"])
def test_mib_tasks_pair_up_and_answer_in_one_token(tokenizers, which):
    tok = tokenizers[which]
    for name in ("mib-ioi", "mib-mcqa", "mib-arithmetic-addition", "mib-arithmetic-subtraction"):
        task = get_task(name, n_prompts=12, tokenizer=tok)
        assert task.name == name and task.metric == "logit_diff" and task.ablation == "corrupt"
        assert task.answers.shape == task.wrong_answers.shape == (12, 1)
        assert (task.answers != task.wrong_answers).all()
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        for row in range(task.n_prompts):
            end = task.positions[row, 0]
            # the same length position by position: padding starts at the same place in both prompts
            assert ((task.clean[row] == tok.pad_id) == (task.corrupt[row] == tok.pad_id)).all()
            assert task.clean[row, 0] == task.corrupt[row, 0] == start
            assert (task.clean[row, end + 1:] == tok.pad_id).all() and end == len(tok.encode(task.prompts[row]))
            prompt, answer, wrong = task.prompts[row], tok.token_text(task.answers[row, 0]), tok.token_text(task.wrong_answers[row, 0])
            if name == "mib-ioi":  # the IO is named once, the subject twice; the counterfactual names the IO twice
                io, s = answer.strip(), wrong.strip()
                assert len(re.findall(rf"\b{io}\b", prompt)) == 1 and len(re.findall(rf"\b{s}\b", prompt)) == 2
                assert prompt.endswith(" to")
                assert list(task.corrupt[row]).count(task.answers[row, 0]) == 2
            elif name == "mib-mcqa":  # the answer letter is the line of the colour the question states
                colour = re.match(r"Question: .*? (?:is|are) (\w+)\.", prompt).group(1)
                assert f"\n{answer.strip()}. {colour}\n" in prompt and answer.strip() in mib.LETTERS[:4]
                assert wrong.strip() in mib.LETTERS[4:] and tok.encode(answer.strip()) == [task.answers[row, 0]]
            else:
                a, op, b = re.match(r"Q: How much is (\d+) (plus|minus) (\d+)\? A: $", prompt).groups()
                assert answer.strip() == str(int(a) + int(b) if op == "plus" else int(a) - int(b))
                assert tok.encode(answer.strip()) == [task.answers[row, 0]]


def test_arithmetic_refuses_a_tokenizer_that_splits_digits(tmp_path):
    word_level_tokenizer(tmp_path, digits_apart=True)
    tok = load_tokenizer(tmp_path)
    with pytest.raises(TaskError, match="one digit per token.*Llama 3.*digits=1"):
        get_task("mib-arithmetic-addition", n_prompts=4, tokenizer=tok)
    # with one-digit operands the answers below 10 are single tokens, but each needs its own digit
    with pytest.raises(TaskError, match="single tokens"):
        get_task("mib-arithmetic-subtraction", n_prompts=4, digits=1, tokenizer=tok)


def test_mcqa_and_ioi_say_what_they_need(tokenizers):
    with pytest.raises(TaskError, match="n_choices must be between 2 and 11"):
        get_task("mib-mcqa", n_choices=12)
    with pytest.raises(TaskError, match="n_prompts must be a positive int"):
        get_task("mib-ioi", n_prompts=0)
    with pytest.raises(TaskError, match="operation must be one of addition, subtraction"):
        get_task("mib-arithmetic", operation="division")
    assert get_task("mib-arithmetic", n_prompts=3, operation="subtraction").name == "mib-arithmetic-subtraction"


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 with GPT-2's vocabulary and no tokenizer files (GPT-2's shipped one poses the tasks)."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mib") / "tiny"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=64)).save_pretrained(folder)
    return folder


def test_mib_command_writes_a_submission_that_reads_back_and_recomputes(tiny_gpt2, tmp_path):
    out = tmp_path / "sub"
    result = runner.invoke(app, ["mib", "--model", str(tiny_gpt2), "--task", "ioi", "--method", "eap", "--prompts", "4",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "not one MIB evaluates" in text and "CPR" in text and "CMD" in text
    folder = out / "eap_patching_edge" / "ioi_tiny"
    assert [p.name for p in folder.iterdir()] == ["importances.json"]  # MIB reads every file there as a circuit
    doc = json.loads((folder / "importances.json").read_text())
    assert doc["cfg"] == {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}
    assert "a0.h1->m0" in doc["edges"] and "input->a0.h0<k>" in doc["edges"]

    # the same circuit as the method gives in Python
    model = load_model(tiny_gpt2)
    task = get_task("mib-ioi", n_prompts=4, tokenizer=gpt2_tokenizer())
    circuit = discover(model, task, "eap", ablation="corrupt", score=False)
    back = export.from_mib(doc)
    assert back.graph == circuit.graph and back.kept == circuit.kept
    np.testing.assert_array_equal(back.scores, circuit.scores)  # divided by 4 prompts per batch and back: exact

    results = json.loads((out / "eap_patching_edge" / "ioi_tiny_results.json").read_text())
    n = circuit.graph.n_gates
    assert results["task"] == "ioi" and results["model"] == "tiny" and results["n_edges"] == n == 46
    assert results["fractions"] == list(ev.MIB_FRACTIONS) and results["n_kept"] == [int(k * n) for k in ev.MIB_FRACTIONS]
    for key in ("signed", "absolute"):
        curve = results["curves"][key]
        assert curve["faithfulness"][-1] == 1.0 and curve["faithfulness"][0] == 0.0
        assert curve["mib_edge_counts"][-1] == n and curve["mib_edge_counts"][0] == 0
        assert curve["cpr"] == pytest.approx(ev.cpr(ev.MIB_FRACTIONS, curve["faithfulness"]), abs=1e-15)
        assert curve["cmd"] == pytest.approx(ev.cmd(ev.MIB_FRACTIONS, curve["faithfulness"]), abs=1e-15)
    assert results["cpr"] == results["curves"]["signed"]["cpr"] and results["cmd"] == results["curves"]["absolute"]["cmd"]
    # recomputed from the file as MIB reads it, on the same model and prompts
    problem = Problem.build(model, task, metric="logit_diff", ablation="corrupt")
    again = ev.mib_evaluation(problem, ev.mib_scores(back.scores, results["submission"]["prompts_per_batch"]))
    assert again.cpr == pytest.approx(results["cpr"], abs=1e-12) and again.cmd == pytest.approx(results["cmd"], abs=1e-12)
    np.testing.assert_allclose(again.signed.faithfulness, results["curves"]["signed"]["faithfulness"], rtol=0, atol=1e-12)
    assert results["full_metric"] == pytest.approx(again.signed.full_value, abs=1e-12)
    np.testing.assert_array_equal(results["curves"]["signed"]["mib_edge_counts"], again.pruned_counts_signed)
    assert again.pruned_counts_signed.tolist() == [
        int(ev.prune_dangling(circuit.graph, ev.ranking(ev.mib_scores(back.scores, 4)) < k).sum()) for k in results["n_kept"]]

    # nine circuits instead: the top int(k * n) edges by |score| at each fraction up to 50%, nested
    result = runner.invoke(app, ["mib", "--model", str(tiny_gpt2), "--task", "ioi", "--method", "eap", "--prompts", "4",
                                 "--out", str(out), "--format", "circuits", "--rank", "absolute", "--model-name", "tiny"])
    assert result.exit_code == 0, result.output
    files = sorted(folder.iterdir(), key=lambda p: float(p.stem.split("_")[1]))
    assert [p.name for p in files] == [f"circuit_{k:g}.json" for k in ev.MIB_FRACTIONS[:-1]]  # importances.json replaced
    order = ev.ranking(ev.mib_scores(circuit.scores, 4), absolute=True)
    for k, path in zip(ev.MIB_FRACTIONS, files):
        kept = export.from_mib(json.loads(path.read_text())).kept_mask()
        np.testing.assert_array_equal(kept, order < int(k * n))
    circuits = json.loads((out / "eap_patching_edge" / "ioi_tiny_results.json").read_text())
    assert circuits["cpr_ranking"] == circuits["cmd_ranking"] == "absolute"
    assert circuits["curves"]["absolute"]["mib_edge_counts"] == circuits["n_kept"]  # MIB counts the files' edges
    assert circuits["cpr"] == pytest.approx(again.absolute.cpr, abs=1e-12) and circuits["cmd"] == pytest.approx(again.cmd, abs=1e-12)


def test_mib_command_bad_input_gets_a_clear_message(tiny_gpt2, tmp_path):
    model = ["--model", str(tiny_gpt2)]
    cases = [
        (["mib", *model, "--task", "arc-easy", "--method", "eap"], "unknown MIB task 'arc-easy'"),
        (["mib", *model, "--task", "ioi", "--method", "hisp"], "scores nodes"),
        (["mib", *model, "--task", "ioi", "--method", "eap", "--format", "pt"], "--format must be one of scores, circuits"),
        (["mib", *model, "--task", "ioi", "--method", "eap", "--rank", "absolute"], "--rank applies to --format circuits"),
        (["mib", "--task", "ioi", "--method", "eap"], "pass --model NAME_OR_DIR, or --random-weights"),
        (["mib", *model, "--task", "ioi", "--method", "acdc"], "needs --threshold"),
        (["mib", *model, "--task", "ioi", "--method", "eap", "--model-name", "my_model"], "without '_'"),
        (["mib", *model, "--task", "ioi", "--method", "eap", "--task-option", "n_prompts=3"], "not --task-option"),
        (["mib", *model, "--task", "ioi", "--method", "eap", "--task-option", "digits=1"], "no chosen task takes the option digits"),
        (["mib", "--model", "/nonexistent", "--task", "ioi", "--method", "eap"], "no model"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args + ["--out", str(tmp_path / "x")])
        assert result.exit_code == 2, (args, result.output)
        assert message in flat(result.output), (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
    (tmp_path / "y" / "eap_patching_edge" / "ioi_tiny").mkdir(parents=True)
    (tmp_path / "y" / "eap_patching_edge" / "ioi_tiny" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["mib", *model, "--task", "ioi", "--method", "eap", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "holds notes.txt" in flat(result.output)

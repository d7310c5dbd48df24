"""The acdc-jax command: discover, evaluate, info, and its error messages."""

import json

from typer.testing import CliRunner

from acdc_jax.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_discover_writes_the_circuit_json_and_scores_it(tmp_path):
    out = tmp_path / "circuit.json"
    result = runner.invoke(app, ["discover", "--task", "tracr-xproportion", "--method", "acdc", "--threshold", "0.001", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ROC AUC 1.000, precision 1.000, recall 1.000" in flat(result.output)
    data = json.loads(out.read_text())
    assert data["method"] == "acdc" and data["task"] == "tracr-xproportion" and data["threshold"] == 0.001
    assert len(data["edges"]) == data["n_edges_total"] == 23
    assert sorted(data["circuit"]) == sorted(["a1.0->logits", "embed->a1.0.q", "embed->a1.0.k", "mlp0->a1.0.v", "embed->mlp0"])
    assert data["auc"] == 1.0 and data["seconds"] > 0
    evaluated = runner.invoke(app, ["evaluate", str(out)])
    assert evaluated.exit_code == 0 and "ROC AUC 1.000" in flat(evaluated.output)


def test_discover_passes_method_and_task_options(tmp_path):
    result = runner.invoke(app, [
        "discover", "--task", "tracr-xproportion", "--task-option", "data=corrected", "--method", "path-patching",
        "--threshold", "0.0001", "--ablation", "zero", "--option", "grouped=true",
    ])
    assert result.exit_code == 0, result.output
    assert "path-patching on tracr-xproportion" in result.output


def test_wrong_answer_weights_target_writes_a_node_circuit(tmp_path):
    out = tmp_path / "nodes.json"
    result = runner.invoke(app, [
        "discover", "--task", "tracr-reverse", "--method", "wrong-answer", "--option", "loss=most_dissimilar",
        "--option", "target=weights", "--option", "top_n=4", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["settings"]["target"] == "weights" and data["settings"]["weight_score"] == "grad_norm"
    assert len(data["circuit"]) == 4 and not any("->" in unit for unit in data["circuit"])
    assert 0.0 <= data["auc"] <= 1.0


def test_bad_input_gets_a_clear_message():
    cases = [
        (["discover", "--task", "tracr-revers", "--threshold", "0.1"], "did you mean tracr-reverse"),
        (["discover", "--task", "tracr-reverse", "--threshold", "-1"], "threshold must be a number >= 0"),
        (["discover", "--task", "tracr-reverse", "--method", "acdc"], "needs --threshold"),
        (["discover", "--task", "tracr-reverse", "--threshold", "0.1", "--option", "speed=11"], "has no option speed"),
        (["discover", "--task", "tracr-reverse", "--threshold", "0.1", "--model", "/nonexistent"], "no model"),
        (["discover", "--task", "tracr-reverse", "--threshold", "0.1", "--ablation", "half"], "unknown ablation"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in flat(result.output), (args, result.output)


def test_info_prints_graph_sizes_without_weights():
    result = runner.invoke(app, ["info", "--model", "gpt2", "--methods", "--tasks"])
    assert result.exit_code == 0, result.output
    for size in ("32,491", "32,923", "11,611", "157"):
        assert size in result.output
    assert "path-patching" in result.output and "tracr-reverse" in result.output


def test_train_induction_writes_a_loadable_checkpoint_with_its_record(tmp_path):
    import acdc_jax as aj

    out = tmp_path / "induction"
    args = ["train-induction", "--out", str(out), "--seed", "2", "--induction-steps", "100", "--full-steps", "100",
            "--batch-size", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "next-token loss" in result.output and "200 steps" in flat(result.output)  # rich may wrap the path
    record = json.loads((out / "training.json").read_text())
    assert record["seed"] == 2 and record["steps"] == 200 and [r["step"] for r in record["train_loss"]] == [100, 200]
    model = aj.load_model(str(out))
    assert model.config.n_layers == 2 and model.config.d_mlp is None
    again = runner.invoke(app, args[:2] + [str(tmp_path / "again")] + args[3:])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "training.json").read_text())["train_loss"] == record["train_loss"]


def test_train_induction_rejects_bad_settings(tmp_path):
    result = runner.invoke(app, ["train-induction", "--out", str(tmp_path / "x"), "--batch-size", "0"])
    assert result.exit_code != 0
    assert "batch_size must be positive" in flat(result.output)


def _tiny_gpt2_dir(path, n_positions=64):
    """A random 1-layer GPT-2 with GPT-2's vocabulary (so IOI's prompts fit), saved by transformers."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=n_positions)).save_pretrained(path)
    return path


def test_discover_on_another_model_writes_the_circuit_and_skips_a_canonical_that_does_not_fit(tmp_path):
    model_dir = _tiny_gpt2_dir(tmp_path / "tiny")
    out = tmp_path / "circuit.json"
    result = runner.invoke(app, ["discover", "--model", str(model_dir), "--task", "ioi", "--task-option", "n_prompts=4",
                                 "--method", "eap", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "not scored against the canonical circuit" in flat(result.output)
    data = json.loads(out.read_text())
    assert data["task"] == "ioi" and "auc" not in data and len(data["edges"]) == data["n_edges_total"]

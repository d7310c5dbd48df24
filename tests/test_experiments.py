"""The experiment modules and the comparison table run end to end on the shipped models."""

import json

import pytest
from typer.testing import CliRunner

from acdc_jax.cli import app
from experiments import compare, tracr_reverse, wrong_answer_noise  # noqa: F401  (importable as modules)
from experiments._runner import RANDOM_WEIGHTS_LABEL, main, run_experiment

QUICK = ["acdc", "eap-ig", "node-patching"]


@pytest.mark.parametrize("task", ["tracr-reverse", "tracr-xproportion"])
def test_task_module_writes_rows_table_and_plots(task, tmp_path):
    main(task, ["--small", "--methods", *QUICK, "--out", str(tmp_path)])
    folder = tmp_path / task
    rows = json.loads((folder / "rows.json").read_text())
    assert [r["method"] for r in rows] == ["ACDC", "EAP-IG", "node patching"]
    acdc = rows[0]
    assert acdc["edge_auc"] == 1.0 and acdc["node_auc"] == 1.0  # zero ablation: the ground truth's own setting
    for name in ("acdc.json", "eap-ig.json", "node-patching.json", "table.md", "roc.png", "faithfulness.png"):
        assert (folder / name).stat().st_size > 0, name
    assert "| ACDC | 1 | 1 |" in (folder / "table.md").read_text()


def test_compare_runs_every_method(tmp_path):
    path = compare.compare(["tracr-xproportion"], small=True, out=tmp_path, echo=lambda *_: None)
    text = path.read_text()
    for label in ("ACDC", "EAP", "EAP-IG", "AtP*", "Edge Pruning", "HISP", "Subnetwork Probing", "node patching",
                  "path patching"):
        assert f"| tracr-xproportion | {label} |" in text, label


def test_gpt2_tasks_need_weights_or_a_labelled_dry_run(tmp_path):
    with pytest.raises(SystemExit, match="weights are not shipped"):
        run_experiment("ioi", small=True, out=tmp_path, echo=lambda *_: None)
    rows = run_experiment("ioi", random_weights=True, small=True, methods=["node-patching", "eap"], out=tmp_path,
                          echo=lambda *_: None)
    assert all(RANDOM_WEIGHTS_LABEL in r["model"] for r in rows)
    assert RANDOM_WEIGHTS_LABEL in (tmp_path / "ioi-random-weights" / "table.md").read_text()


def test_experiment_and_compare_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["experiment", "tracr-xproportion", "--small", "--method", "node-patching",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tracr-xproportion" / "rows.json").exists()
    result = runner.invoke(app, ["compare", "--task", "tracr-xproportion", "--small", "--method", "acdc",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| tracr-xproportion | ACDC |" in (tmp_path / "compare.md").read_text()


def test_wrong_answer_noise_table(tmp_path):
    path = wrong_answer_noise.run(["tracr-xproportion"], seeds=(0,), losses=("inverse", "mse"), n_prompts=6,
                                  eap_ig_steps=3, out=tmp_path, echo=lambda *_: None)
    rows = json.loads((tmp_path / "wrong_answer_noise.json").read_text())
    # mse needs answers and wrong answers, which tracr has not: EAP, EAP-IG, inverse at the gates and the weights
    assert [(r["row"], r["target"]) for r in rows] == [
        ("EAP (at gates 0)", "gates"), ("EAP-IG (3 steps)", "gates"),
        ("wrong-answer inverse", "gates"), ("wrong-answer inverse", "weights")]
    assert rows[0]["note"].startswith("every score 0")  # l2 on tracr: no gradient at either end
    gates, weights = rows[2], rows[3]
    assert gates["units"] == 23 and weights["units"] == 5  # edges; embed, a0.0, mlp0, a1.0, mlp1
    for r in rows[1:]:
        assert -1 <= r["spearman"] <= 1 and 0 <= r["top_k_overlap"] <= 1 and 0 <= r["node_auc"] <= 1
    assert "edge_auc" in gates and "edge_auc" not in weights and "rho_vs_eap" not in gates  # EAP had no ranking
    assert "| tracr-xproportion | wrong-answer inverse | weights | 5 |" in path.read_text()

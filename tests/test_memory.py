"""The memory plan: from the config alone, consistent with the model's arrays and the methods' own chunk estimates."""

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import acdc_jax as aj
from acdc_jax.cli import app
from acdc_jax.memory import fitting_mesh, human, memory_plan, split_activation_bytes, weight_bytes
from acdc_jax.methods import Problem
from acdc_jax.methods._gradients import split_backward_bytes
from acdc_jax.models import TransformerConfig, model_arrays
from acdc_jax.patching import activation_bytes, bytes_per_configuration
from acdc_jax.sharding import make_mesh, shard_model
from acdc_jax.tasks import Task, get_task


def test_the_plan_matches_the_model_and_the_chunk_estimate():
    cfg = TransformerConfig(n_layers=2, n_heads=4, n_kv_heads=2, d_model=16, d_head=4, d_mlp=24, d_vocab=29, n_ctx=9,
                            normalization="rms", positional="rotary", gated_mlp=True, act_fn="silu", tied_unembed=False)
    model = aj.init_model(cfg, jax.random.PRNGKey(0))
    assert weight_bytes(cfg) == sum(np.asarray(a).nbytes for a in model_arrays(model).values())
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 29, (6, 8))
    run = aj.GatedRun(model, aj.Graph.from_model(model), tokens, aj.corrupt_ablation(model, rng.randint(0, 29, (6, 8))))
    plan = memory_plan(cfg, n_prompts=6, n_pos=8, acdc_width=2)
    deltas = cfg.n_sources * 6 * 8 * cfg.d_model * 4
    acdc = plan["methods"]["acdc (width 2)"]["least"]
    assert acdc == weight_bytes(cfg) + deltas + 2 * (bytes_per_configuration(run) + 6 * cfg.d_vocab_out * 4)
    # the gradient methods at uniform gates run one residual stream: the estimate they chunk prompts by
    problem = Problem.build(model, Task(name="t", clean=tokens, corrupt=rng.randint(0, 29, (6, 8)),
                                        positions=np.full((6, 1), 7), metric="kl"), ablation="corrupt")
    logits = cfg.d_vocab_out * 4
    eap = plan["methods"]["eap, hisp, wrong-answer"]
    assert eap["least"] == plan["weights"] + split_backward_bytes(problem) + logits
    assert eap["all_at_once"] - plan["weights"] == 6 * (eap["least"] - plan["weights"])
    assert plan["methods"]["eap-ig (5 steps)"] == eap  # its steps run one after another
    atp = plan["methods"]["atp-star (3 GradDrop points)"]  # no drop, then each of the 2 layers dropped
    assert atp["least"] == plan["weights"] + 3 * (split_backward_bytes(problem, pattern=True) + logits)
    inputs = plan["methods"]["eap-ig-inputs (5 steps)"]  # the gated forward's backward, every configuration at once
    assert inputs["all_at_once"] == plan["weights"] + 5 * 6 * 2 * (cfg.n_layers + 1) * (
        bytes_per_configuration(run) // 6 + cfg.d_vocab_out * 4)
    split = memory_plan(cfg, n_prompts=6, n_pos=8, prompt_devices=3)
    assert split["prompts_per_device"] == 2
    whole = memory_plan(cfg, n_prompts=6, n_pos=8)
    assert split["methods"]["acdc (width 1)"]["least"] < whole["methods"]["acdc (width 1)"]["least"]


def test_the_mesh_that_fits_and_bad_input():
    cfg = TransformerConfig.gpt2("gpt2")
    need = memory_plan(cfg, n_prompts=256, n_pos=16)["methods"]["acdc (width 1)"]["least"]
    # three devices hold a third each, but one holds the weights whole: the next power of 2, all on prompts
    assert fitting_mesh(cfg, need // 3, n_prompts=256, n_pos=16) == (4, 1)
    half = weight_bytes(cfg) * 6 // 10  # the weights alone need splitting (the vocabulary of 50,257 does not split)
    prompts, model = fitting_mesh(cfg, half, n_prompts=256, n_pos=16)
    assert model >= 2
    fits = memory_plan(cfg, n_prompts=256, n_pos=16, prompt_devices=prompts, model_devices=model)
    assert fits["methods"]["acdc (width 1)"]["least"] <= half
    if model > 2:  # the same number of devices with fewer on the model axis does not fit
        fewer = memory_plan(cfg, n_prompts=256, n_pos=16, prompt_devices=prompts * 2, model_devices=model // 2)
        assert fewer["methods"]["acdc (width 1)"]["least"] > half
    assert fitting_mesh(cfg, 10**6, n_prompts=256, n_pos=16) is None
    with pytest.raises(ValueError, match=">= 1"):
        memory_plan(cfg, n_prompts=0, n_pos=16)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        memory_plan(cfg, n_prompts=8, n_pos=16, model_devices=8)  # 12 heads


@pytest.mark.skipif(jax.device_count() < 2, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_the_plan_on_a_model_axis_matches_the_shards():
    cfg = TransformerConfig(n_layers=2, n_heads=4, n_kv_heads=2, d_model=16, d_head=4, d_mlp=24, d_vocab=30, n_ctx=9,
                            normalization="rms", positional="rotary", gated_mlp=True, act_fn="silu", tied_unembed=False,
                            d_vocab_out=29)
    placed = shard_model(aj.init_model(cfg, jax.random.PRNGKey(0)), make_mesh(1, 1, 2, devices=jax.devices()[:2]))
    on_one_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(placed))
    plan = memory_plan(cfg, n_prompts=6, n_pos=8, model_devices=2)
    assert plan["weights"] == on_one_device < weight_bytes(cfg)
    n_in = aj.Graph.from_model(cfg).n_in
    assert split_activation_bytes(cfg, n_in, 6, 8, 4, 1) == activation_bytes(cfg, n_in, 6, 8, 4)
    whole = memory_plan(cfg, n_prompts=6, n_pos=8)
    for name in whole["methods"]:
        assert plan["methods"][name]["least"] < whole["methods"][name]["least"]


def test_info_prints_the_plan():
    result = CliRunner().invoke(app, ["info", "--model", "gpt2", "--prompts", "200", "--pos", "16"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "memory per device: 200 prompts x 16 tokens" in text and "weights 474.9 MB" in text and "acdc (width 1)" in text
    bad = CliRunner().invoke(app, ["info", "--model", "gpt2", "--prompts", "10", "--dtype", "int8"])
    assert bad.exit_code != 0 and "float32 or bfloat16" in bad.output
    cfg = TransformerConfig.gpt2("gpt2")
    result = CliRunner().invoke(app, ["info", "--model", "gpt2", "--prompts", "200", "--pos", "16", "--prompt-devices", "2",
                                      "--model-devices", "4"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    split = memory_plan(cfg, n_prompts=200, n_pos=16, prompt_devices=2, model_devices=4)
    assert "mesh of 2 prompt x 4 model device(s) (100 prompts each)" in text and f"weights {human(split['weights'])}" in text
    small = weight_bytes(cfg) * 8 // 10  # one device of this size holds a split model only
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["info", "--model", "gpt2", "--prompts", "200", "--pos", "16",
                                                             "--device-memory", str(small)])
    p, m = fitting_mesh(cfg, small, n_prompts=200, n_pos=16, method="eap")
    # the table may wrap its cells over lines (the console's width is fixed when the CLI is imported):
    # read its last column line by line
    last_column = " ".join(line.split("│")[-2] for line in result.output.splitlines() if line.count("│") >= 2)
    assert m > 1 and f"--prompt-devices {p} --model-devices {m}" in " ".join(last_column.split()), result.output


def test_discover_refuses_a_run_that_does_not_fit():
    """With a (fake) device memory just below ACDC's need, the run is refused before it starts, naming the mesh."""
    task = get_task("tracr-reverse")
    cfg = aj.load_model("tracr-reverse").config
    sizes = dict(n_prompts=task.clean.shape[0], n_pos=task.clean.shape[1], n_read=task.positions.shape[1])
    need = memory_plan(cfg, **sizes)["methods"]["acdc (width 1)"]["least"]
    args = ["discover", "--task", "tracr-reverse", "--method", "acdc", "--threshold", "0.01", "--device-memory", str(need - 1)]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code != 0 and "needs about" in text and "a mesh of 1 prompt x 1 model devices" in text, text
    p, m = fitting_mesh(cfg, need - 1, **sizes)
    assert f"--prompt-devices {p} --model-devices {m}" in text
    many = CliRunner().invoke(app, ["discover", "--task", "tracr-reverse", "--prompt-devices", "64"])
    assert many.exit_code != 0 and "needs 64 devices" in " ".join(many.output.split())

"""The memory plan: from the config alone, consistent with the model's arrays and the methods' own chunk estimates."""

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import acdc_jax as aj
from acdc_jax.cli import app
from acdc_jax.memory import memory_plan, mesh_that_fits, weight_bytes
from acdc_jax.models import TransformerConfig, model_arrays
from acdc_jax.patching import bytes_per_configuration


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
    eap = plan["methods"]["eap, hisp, atp-star, wrong-answer"]
    assert eap["all_at_once"] - plan["weights"] == 6 * (eap["least"] - plan["weights"])
    split = memory_plan(cfg, n_prompts=6, n_pos=8, prompt_devices=3)
    assert split["prompts_per_device"] == 2
    whole = memory_plan(cfg, n_prompts=6, n_pos=8)
    assert split["methods"]["acdc (width 1)"]["least"] < whole["methods"]["acdc (width 1)"]["least"]


def test_the_mesh_that_fits_and_bad_input():
    cfg = TransformerConfig.gpt2("gpt2")
    need = memory_plan(cfg, n_prompts=256, n_pos=16)["methods"]["acdc (width 1)"]["least"]
    devices = mesh_that_fits(cfg, need // 3, n_prompts=256, n_pos=16)
    assert devices == 4  # three devices hold a third each, but one holds the weights whole: the next power of 2
    assert mesh_that_fits(cfg, weight_bytes(cfg) // 2, n_prompts=256, n_pos=16) is None
    with pytest.raises(ValueError, match=">= 1"):
        memory_plan(cfg, n_prompts=0, n_pos=16)


def test_info_prints_the_plan():
    result = CliRunner().invoke(app, ["info", "--model", "gpt2", "--prompts", "200", "--pos", "16"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "memory per device: 200 prompts x 16 tokens" in text and "weights 474.9 MB" in text and "acdc (width 1)" in text
    bad = CliRunner().invoke(app, ["info", "--model", "gpt2", "--prompts", "10", "--dtype", "int8"])
    assert bad.exit_code != 0 and "float32 or bfloat16" in bad.output

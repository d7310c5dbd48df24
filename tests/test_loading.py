"""Offline loading: parity with transformers, every weights format, tracr exports, and clear errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import serialization
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import acdc_jax as aj
from acdc_jax.models import InputError, LoadError, check_tokens, model_arrays

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

HF_CONFIGS = {
    "small-tied": dict(n_layer=2, n_head=4, n_embd=32, vocab_size=101, n_positions=16),
    "exact-gelu-inner-layer-scaled": dict(
        n_layer=3, n_head=2, n_embd=24, vocab_size=67, n_positions=20, n_inner=40,
        activation_function="gelu", scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-4,
    ),
    "untied-relu": dict(n_layer=1, n_head=3, n_embd=18, vocab_size=50, n_positions=8, tie_word_embeddings=False, activation_function="relu"),
}


def _hf_model(kwargs, seed=0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, **kwargs)).eval()
    with torch.no_grad():  # move every weight off its init so that a swapped tensor cannot hide
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _flax_tree(state: dict[str, np.ndarray], tied: bool) -> dict:
    """A torch GPT-2 state dict in Hugging Face's Flax layout (see the fixture made by HF's own code)."""
    tree: dict = {}
    for name, value in state.items():
        if name.endswith(("attn.bias", "attn.masked_bias")) and "c_" not in name:
            continue
        if name == "lm_head.weight":
            if not tied:
                tree.setdefault("lm_head", {})["kernel"] = value.T
            continue
        parts = name.removeprefix("transformer.").split(".")
        *path, leaf = parts
        module = path[-1]
        if module in ("wte", "wpe"):
            leaf = "embedding"
        elif module.startswith("ln"):
            leaf = "scale" if leaf == "weight" else leaf
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        node = tree.setdefault("transformer", {})
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _save_all_formats(hf, root: Path) -> dict[str, Path]:
    dirs = {fmt: root / fmt for fmt in ("safetensors", "bin", "msgpack")}
    hf.save_pretrained(dirs["safetensors"])
    dirs["bin"].mkdir()
    shutil.copy(dirs["safetensors"] / "config.json", dirs["bin"])
    torch.save(hf.state_dict(), dirs["bin"] / "pytorch_model.bin")
    dirs["msgpack"].mkdir()
    shutil.copy(dirs["safetensors"] / "config.json", dirs["msgpack"])
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    tree = _flax_tree(state, hf.config.tie_word_embeddings)
    (dirs["msgpack"] / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    return dirs


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parity_with_transformers_in_every_format(tmp_path, name):
    kwargs = HF_CONFIGS[name]
    hf = _hf_model(kwargs)
    dirs = _save_all_formats(hf, tmp_path)
    tokens = np.random.RandomState(1).randint(0, kwargs["vocab_size"], (3, kwargs["n_positions"]))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    outputs = {fmt: np.asarray(aj.load_model(d)(tokens)) for fmt, d in dirs.items()}
    assert np.abs(outputs["safetensors"] - expected).max() <= 1e-5
    np.testing.assert_array_equal(outputs["bin"], outputs["safetensors"])
    np.testing.assert_array_equal(outputs["msgpack"], outputs["safetensors"])


def test_flax_checkpoint_written_by_hugging_face(tmp_path):
    """The fixture was written by transformers 4.57's FlaxGPT2LMHeadModel (tests/fixtures/make_flax_gpt2.py)."""
    ref = np.load(FIXTURES / "flax_gpt2" / "reference.npz")
    for weights in ("flax_model.msgpack", "model.safetensors"):
        d = tmp_path / weights
        d.mkdir()
        shutil.copy(FIXTURES / "flax_gpt2" / "config.json", d)
        shutil.copy(FIXTURES / "flax_gpt2" / weights, d)
        out = np.asarray(aj.load_model(d)(ref["tokens"]))
        assert np.abs(out - ref["flax_logits"]).max() <= 1e-5, weights
        assert np.abs(out - ref["pt_logits"]).max() <= 1e-5, weights


def test_own_format_round_trips(tmp_path, tiny_model):
    aj.save_model(tiny_model, tmp_path / "m")
    loaded = aj.load_model(tmp_path / "m")
    assert loaded.config == tiny_model.config
    for name, value in model_arrays(tiny_model).items():
        np.testing.assert_array_equal(model_arrays(loaded)[name], value, err_msg=name)


# ---------------------------------------------------------------------------------- tracr


def _tracr(task):
    folder = aj.models.models_dir() / "tracr" / task
    datasets = json.loads((folder / "datasets.json").read_text())
    return folder, datasets, np.load(folder / "reference_outputs.npz")


@pytest.mark.parametrize("task", ["reverse", "xproportion"])
def test_tracr_models_reproduce_reference_outputs(task):
    model = aj.load_model(f"tracr-{task}")
    _, datasets, ref = _tracr(task)
    cfg = model.config
    for name, data in datasets["datasets"].items():
        for part in ("clean", "corrupted", "corrupted_acdc"):
            tokens = np.asarray(data["corrupted" if part == "corrupted_acdc" else part])
            pos_ids = None
            if part == "corrupted_acdc":
                pos_ids = np.asarray(datasets["acdc_corrupted_run_pos_permutation"][str(tokens.shape[1])])
            sources = aj.source_values(model, tokens, pos_ids=pos_ids)
            key = f"{name}.{part}."
            np.testing.assert_allclose(model(tokens, pos_ids=pos_ids), ref[key + "logits"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(sources[0], ref[key + "embed"], atol=1e-6, rtol=0)
            per_layer = np.asarray(sources[1:]).reshape((cfg.n_layers, cfg.n_heads + 1) + sources.shape[1:])
            attn = per_layer[:, : cfg.n_heads].sum(1) + np.asarray(model.blocks.attn.b_O)[:, None, None]
            np.testing.assert_allclose(attn, ref[key + "attn_out"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(per_layer[:, cfg.n_heads], ref[key + "mlp_out"], atol=1e-5, rtol=0)


def test_tracr_reverse_outputs_the_reversed_sequence():
    model = aj.load_model("tracr-reverse")
    folder, datasets, _ = _tracr("reverse")
    expected = json.loads((folder / "expected_outputs.json").read_text())
    for name, data in datasets["datasets"].items():
        for part in ("clean", "corrupted"):
            ids = np.asarray(model(np.asarray(data[part])))[:, 1:, :3].argmax(-1)
            np.testing.assert_array_equal(ids, expected[name][part]["output_ids_positions_1_to_end"])


def test_tracr_xproportion_outputs_the_running_fraction_of_x():
    model = aj.load_model("tracr-xproportion")
    folder, datasets, _ = _tracr("xproportion")
    expected = json.loads((folder / "expected_outputs.json").read_text())
    for name, data in datasets["datasets"].items():
        for part in ("clean", "corrupted"):
            frac = np.asarray(model(np.asarray(data[part])))[:, 1:, 0]
            want = np.asarray(expected[name][part]["model_rule_output_positions_1_to_end"], np.float64)
            np.testing.assert_allclose(frac, want, atol=1e-4)


# ---------------------------------------------------------------------------------- errors


@pytest.fixture
def hf_dir(tmp_path):
    hf = _hf_model(HF_CONFIGS["small-tied"])
    hf.save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def test_missing_directory_and_files_are_named(tmp_path, hf_dir):
    with pytest.raises(LoadError, match="no model"):
        aj.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="missing .*config.json"):
        aj.load_model(tmp_path / "empty")
    (hf_dir / "model.safetensors").rename(hf_dir / "tf_model.h5")
    with pytest.raises(LoadError, match=r"no weights .*expected model.safetensors.*tf_model.h5 cannot be read"):
        aj.load_model(hf_dir)


def test_gpt2_by_name_explains_that_weights_are_not_shipped(monkeypatch, tmp_path):
    monkeypatch.setenv("ACDC_JAX_MODELS", str(tmp_path))
    with pytest.raises(LoadError, match="not shipped and cannot be downloaded"):
        aj.load_model("gpt2")


def test_unknown_architecture(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "bloom"  # ALiBi: not a supported family
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unknown architecture: model_type='bloom'.*gpt2.*gpt_neox, llama, mistral, qwen2, qwen3"):
        aj.load_model(hf_dir)


def test_wrong_shape_names_the_tensor(hf_dir):
    state = load_file(hf_dir / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :-1].copy()
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(LoadError, match=r"tensor h\.1\.mlp\.c_fc\.weight .*has shape \(32, 127\), expected \(32, 128\)"):
        aj.load_model(hf_dir)


def test_nan_in_weights_is_refused(hf_dir):
    state = load_file(hf_dir / "model.safetensors")
    state["transformer.h.0.attn.c_proj.bias"][3] = np.nan
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(LoadError, match=r"tensor h\.0\.attn\.c_proj\.bias .*1 NaN/inf"):
        aj.load_model(hf_dir)


def test_pickled_objects_are_refused(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    torch.save({"weights": _Payload()}, hf_dir / "pytorch_model.bin")
    with pytest.raises(LoadError, match="weights_only=True"):
        aj.load_model(hf_dir)


class _Payload:
    """An arbitrary Python object: unpickling it would run code, so weights_only must refuse it."""


def test_tokens_out_of_range_and_too_long(hf_dir):
    model = aj.load_model(hf_dir)
    with pytest.raises(InputError, match=r"token id 101 at \[batch=1, pos=2\] is out of range for a vocabulary of 101"):
        model(np.array([[1, 2, 3], [4, 5, 101]]))
    with pytest.raises(InputError, match="sequence length 17 is longer than the model's n_ctx=16"):
        model(np.zeros((1, 17), np.int32))
    with pytest.raises(InputError, match="integer ids"):  # (under the test hook jaxtyping would refuse it first)
        check_tokens(model.config, np.zeros((1, 3), np.float32))


def test_bf16_safetensors_load_as_float32(hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).to(torch.bfloat16)
    hf.save_pretrained(hf_dir.parent / "bf16")
    model = aj.load_model(hf_dir.parent / "bf16")
    assert model.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(model.embed.W_E), hf.transformer.wte.weight.detach().float().numpy()
    )


def _truncate(file: Path, keep: int = 40) -> None:
    file.write_bytes(file.read_bytes()[:keep])


@pytest.mark.parametrize("kind", ["safetensors", "bin", "msgpack", "config"])
def test_damaged_files_are_named_with_what_to_do(tmp_path, kind):
    from typer.testing import CliRunner

    from acdc_jax.cli import app

    hf = _hf_model(HF_CONFIGS["untied-relu"])
    dirs = _save_all_formats(hf, tmp_path)
    if kind == "config":
        directory, damaged = dirs["safetensors"], "config.json"
        (directory / damaged).write_text('{"n_layer": 1, "n_head":')
    else:
        directory = dirs[kind]
        damaged = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "msgpack": "flax_model.msgpack"}[kind]
        _truncate(directory / damaged)
    with pytest.raises(LoadError, match=rf"{damaged} is damaged or truncated .*re-download it or save the model again"):
        aj.load_model(directory)
    result = CliRunner().invoke(app, ["discover", "--model", str(directory), "--task", "tracr-reverse", "--method", "eap"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"{damaged} is damaged or truncated" in lines[0], result.output

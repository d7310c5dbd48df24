"""Loading and saving models, offline only: Hugging Face GPT-2 directories, tracr exports, our own format.

Every loader produces one flat dict of numpy arrays in our naming (``embed.W_E``,
``blocks.attn.W_Q`` stacked over layers, ...) and hands it to ``build_model``, which checks every
shape against the config and refuses NaN or inf.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ._config import GPT2_SHAPES, ConfigError, TransformerConfig
from ._transformer import MLP, Attention, Block, Embed, LayerNorm, Transformer, Unembed
from .families import FAMILIES
from ._sharded import MODEL, LazyStack, LazyTensor, _slices, lazy_safetensors, parameter_specs, read_part, shard_model
from .families._reader import LayerStack, StateReader, Tensor, unembedding


class LoadError(ValueError):
    """A checkpoint acdc-jax cannot load; the message says what is wrong and what to do."""


OWN_CONFIG_FILE = "acdc_jax_config.json"
OWN_WEIGHTS_FILE = "weights.safetensors"
SHIPPED_TRACR = {"tracr-reverse": "tracr/reverse", "tracr-xproportion": "tracr/xproportion"}
SHIPPED_OWN = {"induction": "induction"}


def models_dir() -> Path:
    """The folder of shipped checkpoints: ``$ACDC_JAX_MODELS``, else ``models/`` beside the package."""
    env = os.environ.get("ACDC_JAX_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models"


def shipped_model_names() -> list[str]:
    return sorted(SHIPPED_TRACR) + sorted(SHIPPED_OWN)


# --------------------------------------------------------------------------------------------
# The one builder


def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a model with this config, in our naming, with its shape."""
    L, H, D, E = config.n_layers, config.n_heads, config.d_model, config.d_head
    KV = config.kv_heads
    shapes = {"embed.W_E": (config.d_vocab, D)}
    if config.positional == "learned":
        shapes["embed.W_pos"] = (config.n_ctx, D)

    def norm(prefix, *lead):
        if config.normalization is not None:
            shapes[prefix + ".w"] = (*lead, D)
        if config.normalization == "ln":
            shapes[prefix + ".b"] = (*lead, D)

    norm("blocks.ln1", L)
    for w, n in (("Q", H), ("K", KV), ("V", KV)):
        shapes[f"blocks.attn.W_{w}"] = (L, n, D, E)
        shapes[f"blocks.attn.b_{w}"] = (L, n, E)
    shapes["blocks.attn.W_O"] = (L, H, E, D)
    if config.post_norms:  # the attention output is normalised: no b_O (it would not be a constant)
        norm("blocks.ln1_post", L)
    else:
        shapes["blocks.attn.b_O"] = (L, D)
    if config.qk_norm:
        shapes |= {"blocks.attn.q_norm": (L, E), "blocks.attn.k_norm": (L, E)}
    if config.has_mlp:
        M = config.d_mlp
        norm("blocks.ln2", L)
        shapes |= {
            "blocks.mlp.W_in": (L, D, M),
            "blocks.mlp.b_in": (L, M),
            "blocks.mlp.W_out": (L, M, D),
            "blocks.mlp.b_out": (L, D),
        }
        if config.gated_mlp:
            shapes |= {"blocks.mlp.W_gate": (L, D, M), "blocks.mlp.b_gate": (L, M)}
        if config.post_norms:
            norm("blocks.ln2_post", L)
    norm("ln_final")
    if not config.tied_unembed:
        shapes["unembed.W_U"] = (D, config.d_vocab_out)
    shapes["unembed.b_U"] = (config.d_vocab_out,)
    return shapes


def check_finite(name: str, array: np.ndarray, where: str = "") -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise LoadError(f"tensor {name}{where} has {bad} NaN/inf entries; the checkpoint is corrupt, re-export it")


def build_model(config: TransformerConfig, arrays: dict[str, np.ndarray], dtype=jnp.float32, where: str = "") -> Transformer:
    """A ``Transformer`` from a flat dict in our naming; every name and shape is checked."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise LoadError(f"parameters do not match the config{where}: missing {missing}, unexpected {extra}")
    params = {}
    for name, shape in shapes.items():
        value = np.asarray(arrays[name])
        if value.shape != shape:
            raise LoadError(f"tensor {name}{where} has shape {value.shape}, expected {shape} for this config")
        check_finite(name, value, where)
        params[name] = jnp.asarray(value, dtype)
    return assemble_model(config, params)


def assemble_model(config: TransformerConfig, params: dict) -> Transformer:
    """The ``Transformer`` of a flat dict of arrays in our naming (checked by the caller)."""

    def ln(prefix):
        return LayerNorm(params[prefix + ".w"], params.get(prefix + ".b")) if prefix + ".w" in params else None

    def group(prefix, names):
        return {k: params[f"{prefix}.{k}"] for k in names if f"{prefix}.{k}" in params}

    attn = Attention(**group("blocks.attn", ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "q_norm", "k_norm")))
    mlp = MLP(**group("blocks.mlp", ("W_in", "b_in", "W_out", "b_out", "W_gate", "b_gate"))) if config.has_mlp else None
    return Transformer(
        config=config,
        embed=Embed(params["embed.W_E"], params.get("embed.W_pos")),
        blocks=Block(ln1=ln("blocks.ln1"), attn=attn, ln2=ln("blocks.ln2"), mlp=mlp,
                     ln1_post=ln("blocks.ln1_post"), ln2_post=ln("blocks.ln2_post")),
        ln_final=ln("ln_final"),
        unembed=Unembed(params.get("unembed.W_U"), params["unembed.b_U"]),
    )


def build_sharded_model(config: TransformerConfig, arrays: dict, mesh, dtype=jnp.float32, where: str = "") -> Transformer:
    """``build_model`` straight onto a mesh: each parameter split as ``parameter_specs`` says, each
    device's shard read from its ``LazyTensor``/``LazyStack`` (or sliced from a numpy array) by
    ``jax.make_array_from_callback``, so only shards and one layer's box of a file tensor are ever
    on the host. Devices that hold the same shard share one read."""
    from jax.sharding import NamedSharding

    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise LoadError(f"parameters do not match the config{where}: missing {missing}, unexpected {extra}")
    specs = parameter_specs(config, dict(mesh.shape).get(MODEL, 1))
    np_dtype = np.dtype(dtype)
    params = {}
    for name, shape in shapes.items():
        value = arrays[name]
        if tuple(value.shape) != shape:
            raise LoadError(f"tensor {name}{where} has shape {tuple(value.shape)}, expected {shape} for this config")
        if not isinstance(value, (LazyTensor, LazyStack)):
            check_finite(name, np.asarray(value), where)
        read = {}

        def shard(index, value=value, read=read):
            key = tuple((i.start, i.stop, i.step) for i in _slices(index, shape))
            if key not in read:  # replicas of one shard: read once
                read[key] = read_part(value, index).astype(np_dtype)
            return read[key]

        params[name] = jax.make_array_from_callback(shape, NamedSharding(mesh, specs[name]), shard)
    return dataclasses.replace(assemble_model(config, params), mesh=mesh)


def model_arrays(model: Transformer) -> dict[str, np.ndarray]:
    """The inverse of ``build_model``: a flat dict of numpy arrays in our naming."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        name = ".".join(str(getattr(p, "name", getattr(p, "key", p))) for p in path)
        out[name] = np.asarray(leaf)
    return out


def init_model(config: TransformerConfig, key: jax.Array, *, std: float = 0.02) -> Transformer:
    """Random parameters: normal(0, std) weights and biases, norm scales near 1 (Gemma's ``(1 + w)``
    norms: ``w`` near 0).

    The numbers come from numpy, seeded by the key's bits (same key, same model): drawing them
    with ``jax.random`` compiles a sampler per parameter shape, seconds per model on a CPU.
    """
    seed = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    rng = np.random.default_rng(seed.astype(np.uint32).ravel().tolist())
    arrays = {}
    unit = 0.0 if config.normalization == "gemma_rms" else 1.0
    for name, shape in expected_shapes(config).items():
        draw = rng.standard_normal(shape, dtype=np.float32)
        is_norm = name.endswith(("ln1.w", "ln2.w", "ln1_post.w", "ln2_post.w", "ln_final.w", "q_norm", "k_norm"))
        arrays[name] = unit + 0.1 * draw if is_norm else std * draw
    return build_model(config, arrays)


# --------------------------------------------------------------------------------------------
# Our own format


def save_model(model: Transformer, path: str | os.PathLike) -> Path:
    """Write ``acdc_jax_config.json`` and ``weights.safetensors`` into a directory."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / OWN_CONFIG_FILE).write_text(
        json.dumps({"format": "acdc-jax", "version": 1, "config": model.config.to_dict()}, indent=1)
    )
    save_file({k: np.ascontiguousarray(v) for k, v in model_arrays(model).items()}, str(path / OWN_WEIGHTS_FILE))
    return path


def _damaged(file: Path, err: BaseException, remedy: str = "re-download it or save the model again") -> LoadError:
    """The error for a weights or config file that cannot be parsed (truncated, corrupt, not that format)."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LoadError(f"{file} is damaged or truncated ({detail}): {remedy}")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(file, err, "it is not valid JSON; re-download it or save the model again") from err
    if not isinstance(data, dict):
        raise LoadError(f"{file} holds a JSON {type(data).__name__}, not an object: re-download it or save the model again")
    return data


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: say which file
        raise _damaged(file, err) from err


def _load_own(path: Path, dtype) -> Transformer:
    meta = _read_json(path / OWN_CONFIG_FILE)
    if meta.get("format") != "acdc-jax":
        raise LoadError(f"{path / OWN_CONFIG_FILE} is not an acdc-jax config (format={meta.get('format')!r})")
    weights = path / OWN_WEIGHTS_FILE
    if not weights.exists():
        raise LoadError(f"missing {weights}: an acdc-jax checkpoint needs {OWN_WEIGHTS_FILE} beside its config")
    return build_model(TransformerConfig.from_dict(meta["config"]), _load_safetensors(weights), dtype, f" in {weights}")


# --------------------------------------------------------------------------------------------
# tracr exports (TransformerLens names, as ../shared/tasks/tracr ships them)


def _load_tracr(path: Path, dtype) -> Transformer:
    cfg = _read_json(path / "config.json")
    weights_file = path / "weights.npz"
    if not weights_file.exists():
        raise LoadError(f"missing {weights_file}: a tracr export needs weights.npz beside config.json")
    if cfg.get("normalization_type") is not None or cfg.get("parallel_attn_mlp"):
        raise LoadError(f"{path}: only tracr exports without LayerNorm and with sequential attention/MLP are supported")
    config = TransformerConfig(
        n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"],
        d_model=cfg["d_model"],
        d_head=cfg["d_head"],
        d_mlp=cfg["d_mlp"],
        d_vocab=cfg["d_vocab"],
        d_vocab_out=cfg["d_vocab_out"],
        n_ctx=cfg["n_ctx"],
        act_fn=cfg["act_fn"],
        normalization=None,
        causal=bool(cfg["causal"]),
        attn_scale=float(cfg["attn_scale"]),
        tied_unembed=False,
        name=f"tracr-{cfg.get('task', path.name)}",
    )
    try:
        w = dict(np.load(weights_file))
    except Exception as err:  # noqa: BLE001 - BadZipFile, EOFError, ValueError, ...
        raise _damaged(weights_file, err, "re-export it") from err
    L = config.n_layers

    def stack(fmt):
        return np.stack([w[fmt.format(l=l)] for l in range(L)])

    arrays = {"embed.W_E": w["embed.W_E"], "embed.W_pos": w["pos_embed.W_pos"]}
    for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O"):
        arrays[f"blocks.attn.{name}"] = stack("blocks.{l}.attn." + name)
    for name in ("W_in", "b_in", "W_out", "b_out"):
        arrays[f"blocks.mlp.{name}"] = stack("blocks.{l}.mlp." + name)
    arrays["unembed.W_U"] = w["unembed.W_U"]
    arrays["unembed.b_U"] = w["unembed.b_U"]
    return build_model(config, arrays, dtype, f" in {weights_file}")


# --------------------------------------------------------------------------------------------
# Hugging Face GPT-2 directories

_HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
# Buffers that old GPT-2 checkpoints carry (the causal mask); not parameters.
_HF_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def hf_config_to_ours(hf: dict, name: str = "") -> TransformerConfig:
    """Our config from a Hugging Face GPT-2 ``config.json`` dict; unsupported options are errors."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        archs = hf.get("architectures")
        raise LoadError(
            f"unknown architecture: model_type={model_type!r}, architectures={archs}; acdc-jax loads the "
            f"Hugging Face model types gpt2 (gpt2, gpt2-medium/large/xl, distilgpt2), {', '.join(sorted(FAMILIES))}"
        )
    if hf.get("add_cross_attention"):
        raise LoadError("GPT-2 with cross-attention (add_cross_attention=true) is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise LoadError(f"activation_function {act!r} is not supported; known: {sorted(_HF_ACTIVATIONS)}")
    d_model, n_heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    if d_model % n_heads:
        raise LoadError(f"n_embd={d_model} is not divisible by n_head={n_heads}")
    d_head = d_model // n_heads
    try:
        return TransformerConfig(
            n_layers=hf.get("n_layer", 12),
            n_heads=n_heads,
            d_model=d_model,
            d_head=d_head,
            d_mlp=hf.get("n_inner") or 4 * d_model,
            d_vocab=hf.get("vocab_size", 50257),
            n_ctx=hf.get("n_positions", 1024),
            act_fn=_HF_ACTIVATIONS[act],
            normalization="ln",
            ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            causal=True,
            attn_scale=math.sqrt(d_head) if hf.get("scale_attn_weights", True) else 1.0,
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            tied_unembed=bool(hf.get("tie_word_embeddings", True)),
            name=name,
        )
    except ConfigError as err:
        raise LoadError(f"config.json describes a model acdc-jax cannot build: {err}") from err


def hf_state_dict_to_ours(config: TransformerConfig, state: dict[str, Tensor], where: str = "") -> dict[str, Tensor]:
    """The explicit key map from Hugging Face GPT-2 names to ours.

    HF's ``Conv1D`` stores weights ``[in, out]`` and computes ``x @ W``. ``c_attn.weight`` is
    ``[d_model, 3 * d_model]`` with q, k, v side by side and heads contiguous inside each, so
    ``W_Q[h] = c_attn.weight[:, h*E:(h+1)*E]``; ``c_proj.weight`` rows are the merged heads, so
    ``W_O[h] = c_proj.weight[h*E:(h+1)*E, :]``. ``lm_head.weight`` (``[vocab, d_model]``, a
    ``nn.Linear``) is read only when the embeddings are untied.
    """
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    L, H, D, E = config.n_layers, config.n_heads, config.d_model, config.d_head
    M = config.d_mlp
    take = StateReader(state, "GPT-2", where, ignore=_HF_BUFFERS.pattern)
    out = {"embed.W_E": take("wte.weight", (config.d_vocab, D)), "embed.W_pos": take("wpe.weight", (config.n_ctx, D))}
    layers = LayerStack()
    add = layers.add
    for l in range(L):
        p = f"h.{l}."
        add("blocks.ln1.w", take(p + "ln_1.weight", (D,)))
        add("blocks.ln1.b", take(p + "ln_1.bias", (D,)))
        w_qkv = take(p + "attn.c_attn.weight", (D, 3 * D))
        b_qkv = take(p + "attn.c_attn.bias", (3 * D,))
        for i, w in enumerate("QKV"):
            add(f"blocks.attn.W_{w}", w_qkv[:, i * D : (i + 1) * D].reshape(D, H, E).transpose(1, 0, 2))
            add(f"blocks.attn.b_{w}", b_qkv[i * D : (i + 1) * D].reshape(H, E))
        add("blocks.attn.W_O", take(p + "attn.c_proj.weight", (D, D)).reshape(H, E, D))
        add("blocks.attn.b_O", take(p + "attn.c_proj.bias", (D,)))
        add("blocks.ln2.w", take(p + "ln_2.weight", (D,)))
        add("blocks.ln2.b", take(p + "ln_2.bias", (D,)))
        add("blocks.mlp.W_in", take(p + "mlp.c_fc.weight", (D, M)))
        add("blocks.mlp.b_in", take(p + "mlp.c_fc.bias", (M,)))
        add("blocks.mlp.W_out", take(p + "mlp.c_proj.weight", (M, D)))
        add("blocks.mlp.b_out", take(p + "mlp.c_proj.bias", (D,)))
    out |= layers.stacked()
    out["ln_final.w"] = take("ln_f.weight", (D,))
    out["ln_final.b"] = take("ln_f.bias", (D,))
    out |= unembedding(take, config, "lm_head.weight")
    take.finish()
    return out


def _flax_tree_to_hf_names(tree: dict) -> dict[str, np.ndarray]:
    """Flax GPT-2 params (``flax_model.msgpack``) to the PyTorch state-dict names and layouts.

    Flax names ``embedding`` (Embed), ``scale``/``bias`` (LayerNorm) and ``kernel``. HF's Flax
    ``Conv1D`` keeps its kernel as ``[out, in]`` (it transposes when applying), the transpose of
    PyTorch's ``[in, out]``; the Flax ``lm_head`` is ``nn.Dense`` with kernel ``[d_model, vocab]``,
    the transpose of PyTorch's ``[vocab, d_model]``. Both become PyTorch's layout here.
    """
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = np.asarray(value)

    walk(tree, "")
    out = {}
    for name, value in flat.items():
        base, _, leaf = name.rpartition(".")
        if leaf == "embedding":
            out[base + ".weight"] = value
        elif leaf == "scale":
            out[base + ".weight"] = value
        elif leaf == "kernel":
            out[base + ".weight"] = value.T
        else:
            out[name] = value
    return out


def _read_hf_weights(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The state dict of a HF directory, from the first weights file present, and its file name."""
    if (path / "model.safetensors").exists():
        from safetensors.numpy import load_file

        return _read_safetensors(path / "model.safetensors", load_file), "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.exists():
        from safetensors.numpy import load_file

        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (path / shard).exists()]
        if missing:
            raise LoadError(f"{index} lists shards that are not in {path}: {', '.join(missing)}; copy them beside it")
        state = {}
        for shard in shards:
            state |= _read_safetensors(path / shard, load_file)
        return state, index.name
    if (path / "pytorch_model.bin").exists():
        return _read_torch_bin(path / "pytorch_model.bin"), "pytorch_model.bin"
    if (path / "flax_model.msgpack").exists():
        from flax import serialization

        try:
            tree = serialization.msgpack_restore((path / "flax_model.msgpack").read_bytes())
        except Exception as err:  # noqa: BLE001 - msgpack's ExtraData, ValueError, ...
            raise _damaged(path / "flax_model.msgpack", err) from err
        if not isinstance(tree, dict):
            raise LoadError(f"{path / 'flax_model.msgpack'} does not hold a parameter tree: re-download it or save the model again")
        return _flax_tree_to_hf_names(tree), "flax_model.msgpack"
    present = sorted(p.name for p in path.iterdir())
    refused = [p for p in present if p.endswith((".h5", ".ckpt", ".pt", ".pth", ".pkl"))]
    hint = f" ({', '.join(refused)} cannot be read: convert to safetensors)" if refused else ""
    raise LoadError(
        f"no weights in {path}: expected model.safetensors, pytorch_model.bin or flax_model.msgpack "
        f"beside config.json{hint}; found {present}"
    )


def _read_safetensors(file: Path, load_file) -> dict[str, np.ndarray]:
    try:
        return load_file(str(file))
    except (TypeError, ValueError):  # bf16 has no numpy dtype: go through flax's reader
        from safetensors.flax import load_file as load_jax

        try:
            return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_jax(str(file)).items()}
        except Exception as err:  # noqa: BLE001 - a damaged file fails here too
            raise _damaged(file, err) from err
    except Exception as err:  # noqa: BLE001 - SafetensorError ("invalid header length"), OSError
        raise _damaged(file, err) from err


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise LoadError(
            f"reading {file.name} needs torch (pip install torch==2.13.0), or convert it to model.safetensors"
        ) from err
    import pickle

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object
        raise LoadError(
            f"refusing to load {file}: it is not a plain tensor state dict loadable with weights_only=True ({err})"
        ) from err
    except Exception as err:  # noqa: BLE001 - a truncated zip, EOFError, ...
        raise _damaged(file, err) from err
    if not isinstance(state, dict):
        raise LoadError(f"{file} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _hf_config(path: Path):
    """Our config of a Hugging Face directory and the family module that maps it (None: GPT-2)."""
    hf = _read_json(path / "config.json")
    name = hf.get("_name_or_path") or path.name
    family = FAMILIES.get(hf.get("model_type"))
    if family is None:
        return hf_config_to_ours(hf, name=name), None
    try:
        return family.config_from_hf(hf, name=name), family
    except KeyError as err:
        raise LoadError(f"{path / 'config.json'} (model_type {hf['model_type']!r}) lacks the field {err.args[0]!r}: re-save the config") from err


def hf_directory_config(path: str | os.PathLike) -> TransformerConfig:
    """The config of a Hugging Face model directory, from its ``config.json`` alone (no weights read)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise LoadError(f"missing {path / 'config.json'}: not a Hugging Face model directory")
    return _hf_config(path)[0]


def _lazy_hf_weights(path: Path) -> tuple[dict[str, LazyTensor], str] | None:
    """The state dict of a safetensors HF directory as lazy tensors (headers read only); None without one."""
    if (path / "model.safetensors").exists():
        files, name = [path / "model.safetensors"], "model.safetensors"
    elif (path / "model.safetensors.index.json").exists():
        index = path / "model.safetensors.index.json"
        files = [path / shard for shard in sorted(set(_read_json(index).get("weight_map", {}).values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{index} lists shards that are not in {path}: {', '.join(missing)}; copy them beside it")
        name = index.name
    else:
        return None
    state = {}
    for file in files:
        try:
            state |= lazy_safetensors(file)
        except Exception as err:  # noqa: BLE001 - SafetensorError ("invalid header length"), OSError
            raise _damaged(file, err) from err
    return state, name


def _load_hf(path: Path, dtype, mesh=None) -> Transformer:
    config, family = _hf_config(path)
    to_ours = hf_state_dict_to_ours if family is None else family.state_dict_to_ours
    lazy = None if mesh is None else _lazy_hf_weights(path)
    if lazy is not None:
        state, file_name = lazy
        where = f" in {path / file_name}"
        return build_sharded_model(config, to_ours(config, state, where=where), mesh, dtype, where)
    state, file_name = _read_hf_weights(path)
    where = f" in {path / file_name}"
    model = build_model(config, to_ours(config, state, where=where), dtype, where)
    return model if mesh is None else shard_model(model, mesh)


# --------------------------------------------------------------------------------------------
# The entry point


def model_directory(path_or_name: str | os.PathLike) -> Path:
    """The directory ``load_model(path_or_name)`` reads: the path itself, or a shipped or GPT-2 name's folder."""
    key = str(path_or_name)
    path = Path(path_or_name)
    if not path.exists():
        if key in SHIPPED_TRACR:
            path = models_dir() / SHIPPED_TRACR[key]
        elif key in SHIPPED_OWN:
            path = models_dir() / SHIPPED_OWN[key]
        elif key in GPT2_SHAPES:
            path = models_dir() / key
            if not path.exists():
                raise LoadError(
                    f"GPT-2 weights ({key!r}) are not shipped and cannot be downloaded here. Save a Hugging "
                    f"Face checkpoint (config.json + model.safetensors) to a directory and pass its path, "
                    f"or put it at {path}"
                )
        else:
            raise LoadError(
                f"no model {key!r}: not a directory, and not a shipped name ({', '.join(shipped_model_names())}) "
                f"or a GPT-2 name ({', '.join(GPT2_SHAPES)}) with a directory in {models_dir()}"
            )
        if not path.exists():
            raise LoadError(f"the shipped model {key!r} is missing from {path}; set ACDC_JAX_MODELS to the models/ folder")
    if not path.is_dir():
        raise LoadError(f"{path} is a file; pass the directory that holds config.json and the weights")
    return path


def load_model(path_or_name: str | os.PathLike, *, dtype=jnp.float32, mesh=None) -> Transformer:
    """Load a model from a local directory or a shipped name; nothing is downloaded.

    Names: ``tracr-reverse``, ``tracr-xproportion``, ``induction`` (shipped in ``models/``), and
    ``gpt2``/``gpt2-medium``/... when a Hugging Face directory of that name sits in ``models/``.
    A directory holds either a Hugging Face GPT-2 checkpoint (``config.json`` plus
    ``model.safetensors``, ``pytorch_model.bin`` read with ``weights_only=True``, or
    ``flax_model.msgpack``), a tracr export (``config.json`` + ``weights.npz``) or an acdc-jax
    checkpoint (``acdc_jax_config.json`` + ``weights.safetensors``).

    ``mesh``: a ``jax.sharding.Mesh`` with a ``model`` axis (``acdc_jax.sharding.make_mesh``): the
    weights are split over it (``parameter_specs``) and replicated over its other axes. From
    safetensors (one file or sharded with an index) each device's shard is read straight from the
    file; on several hosts each host reads only its own devices' shards. Other formats are read
    whole, then placed.
    """
    path = model_directory(path_or_name)
    if (path / OWN_CONFIG_FILE).exists():
        model = _load_own(path, dtype)
    elif not (path / "config.json").exists():
        raise LoadError(f"missing {path / 'config.json'}: not a Hugging Face, tracr or acdc-jax model directory")
    elif (path / "weights.npz").exists() and "tracr_compile" in (path / "config.json").read_text():
        model = _load_tracr(path, dtype)
    else:
        return _load_hf(path, dtype, mesh)
    return model if mesh is None else shard_model(model, mesh)

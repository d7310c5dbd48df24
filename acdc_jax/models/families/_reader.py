"""What every family's key map shares: reading named tensors of a known shape, once each."""

from __future__ import annotations

import re

import numpy as np

from .._config import ConfigError, TransformerConfig
from .._sharded import LazyStack, LazyTensor

# A state dict's tensor: read (numpy), or lazy (a safetensors tensor read shard by shard, see ``_sharded``)
Tensor = np.ndarray | LazyTensor | LazyStack


class StateReader:
    """Hands out a Hugging Face state dict's tensors by name, checking each shape and that every
    tensor of the checkpoint was used (except buffers matching ``ignore``)."""

    def __init__(self, state: dict[str, Tensor], family: str, where: str = "", ignore: str = r"$^"):
        from .._loading import LoadError, check_finite

        self._state, self._family, self._where = state, family, where
        self._ignore = re.compile(ignore)
        self._used: set[str] = set()
        self._error, self._check_finite = LoadError, check_finite

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def __call__(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in self._state:
            raise self._error(f"tensor {name}{self._where} is missing (a {self._family} checkpoint with this config.json needs it)")
        raw = self._state[name]
        if isinstance(raw, LazyTensor):  # read later, a shard at a time (checked for NaN/inf then)
            value = raw
        else:
            value = np.asarray(raw) if raw.dtype == np.float64 else np.asarray(raw, dtype=np.float32)
        if value.shape != shape:
            raise self._error(f"tensor {name}{self._where} has shape {value.shape}, expected {shape} from config.json")
        if not isinstance(value, LazyTensor):
            self._check_finite(name, value, self._where)
        self._used.add(name)
        return value

    def optional(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The tensor if the checkpoint has it (a bias the config may switch off), else zeros."""
        return self(name, shape) if name in self._state else np.zeros(shape, np.float32)

    def skip(self, name: str) -> None:
        """A tensor that is read elsewhere or not at all (a tied copy)."""
        self._used.add(name)

    def finish(self) -> None:
        unexpected = sorted(k for k in self._state if k not in self._used and not self._ignore.search(k))
        if unexpected:
            more = " ..." if len(unexpected) > 8 else ""
            raise self._error(f"unexpected tensors{self._where} for a {self._family} LM checkpoint: {unexpected[:8]}{more}")


class LayerStack:
    """Per-layer tensors collected layer by layer, stacked on a leading layer axis at the end (lazily
    when they are ``LazyTensor``s: a ``LazyStack``)."""

    def __init__(self):
        self._items: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, value: Tensor) -> None:
        self._items.setdefault(name, []).append(value)

    def stacked(self) -> dict[str, Tensor]:
        return {name: LazyStack(values) if any(isinstance(v, LazyTensor) for v in values) else np.stack(values)
                for name, values in self._items.items()}


def unembedding(take: StateReader, config: TransformerConfig, name: str) -> dict[str, Tensor]:
    """``unembed.W_U`` (``[vocab, d_model]`` as HF stores it, transposed) unless tied, and a zero ``b_U``."""
    out = {"unembed.b_U": np.zeros((config.d_vocab_out,), np.float32)}
    if config.tied_unembed:
        take.skip(name)  # a tied copy, when saved at all
    else:
        out["unembed.W_U"] = take(name, (config.d_vocab, config.d_model)).T
    return out


def build_config(family: str, **fields) -> TransformerConfig:
    """A ``TransformerConfig``, with a config error reported as a load error naming the family."""
    from .._loading import LoadError

    try:
        return TransformerConfig(**fields)
    except ConfigError as err:
        raise LoadError(f"config.json describes a {family} model acdc-jax cannot build: {err}") from err


def decoder_fields(hf: dict, d_head: int, n_ctx_default: int) -> dict:
    """The ``TransformerConfig`` fields every rotary decoder's config.json names alike (Llama,
    Mistral, Qwen, Gemma-2): sizes, the context length, the RMSNorm epsilon, causal rotary
    attention and a gated MLP."""
    return dict(
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_head=d_head,
        d_mlp=hf["intermediate_size"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf.get("max_position_embeddings", n_ctx_default),
        ln_eps=float(hf.get("rms_norm_eps", 1e-6)),
        causal=True,
        positional="rotary",
        gated_mlp=True,
    )


def rope_settings(hf: dict, d_head: int, family: str) -> dict:
    """``rotary_base``, ``rotary_dim`` and ``rope_scaling`` from either config format: transformers
    >= 5 writes ``rope_parameters`` (``rope_theta``, ``rope_type``, ``partial_rotary_factor`` and
    the scaling's fields); older files have ``rope_theta`` and ``rope_scaling`` at the top level
    (GPT-NeoX: ``rotary_emb_base``, ``rotary_pct``)."""
    from .._loading import LoadError

    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = ("linear", float(params["factor"]))
    elif kind == "llama3":
        scaling = ("llama3", float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                   int(params["original_max_position_embeddings"]))
    else:
        raise LoadError(f"{family}: rope type {kind!r} is not supported (supported: default, linear, llama3)")
    return {"rotary_base": float(base), "rotary_dim": int(d_head * fraction), "rope_scaling": scaling}


def layer_windows(hf: dict, n_layers: int, window: int | None, sliding_by_default, family: str):
    """Our ``sliding_window`` from a config's window and its layer pattern: ``layer_types`` (transformers
    >= 5 writes one ``"sliding_attention"``/``"full_attention"`` per layer) or, in older files,
    ``sliding_by_default(layer)``. One int when every layer slides, a per-layer tuple otherwise, None
    when none does."""
    from .._loading import LoadError

    if window is None:
        return None
    types = hf.get("layer_types")
    if types is None:
        types = ["sliding_attention" if sliding_by_default(layer) else "full_attention" for layer in range(n_layers)]
    if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise LoadError(
            f"{family}: layer_types must list 'sliding_attention' or 'full_attention' for each of the "
            f"{n_layers} layers, got {types!r}"
        )
    windows = tuple(int(window) if kind == "sliding_attention" else None for kind in types)
    if all(w is None for w in windows):
        return None
    return windows[0] if len(set(windows)) == 1 else windows

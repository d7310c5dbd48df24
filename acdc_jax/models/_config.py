"""The one configuration type for every model acdc-jax runs.

GPT-2 family, compiled tracr and attention-only models, and the Hugging Face families whose
differences are data here: Llama, Mistral, Qwen2/2.5 and Qwen3 (RMSNorm, rotary, grouped-query
attention, gated MLP, q/k/v biases, q/k norm, sliding windows in all or some layers),
GPT-NeoX/Pythia (parallel attention and MLP, partial rotary) and Gemma-2 ((1 + w) RMSNorm, norms
after the sublayers, scaled embedding, soft-capped attention scores and logits, alternating
sliding-window layers). Each family's key map lives in ``acdc_jax/models/families/``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

ActFn = Literal["gelu_new", "gelu", "relu", "silu"]

# GPT-2 family shapes: (n_layers, n_heads, d_model). Every one has n_ctx 1024 and vocab 50257.
GPT2_SHAPES: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    "distilgpt2": (6, 12, 768),
}


class ConfigError(ValueError):
    """A model configuration that acdc-jax cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a decoder-style transformer.

    Attention scores are ``q . k / attn_scale`` (GPT-2: ``attn_scale = sqrt(d_head)``, optionally
    times ``layer + 1`` when ``scale_attn_by_inverse_layer_idx``). ``d_mlp=None`` means an
    attention-only model. ``tied_unembed`` means the unembedding is ``W_E.T`` (GPT-2).

    - ``normalization``: ``"ln"`` (LayerNorm with bias), ``"rms"`` (RMSNorm, ``x / rms(x) * w``),
      ``"gemma_rms"`` (Gemma's RMSNorm, ``x / rms(x) * (1 + w)``, computed in float32 before casting
      back) or ``None`` (no norm anywhere: tracr); ``ln_eps`` is its epsilon.
    - ``post_norms``: a norm after each sublayer as well (Gemma-2): the residual receives
      ``norm(attention output)`` and ``norm(MLP output)``. Needs an RMS norm and has no attention
      output bias ``b_O`` (a bias inside the norm would not be a constant). How the normalised
      attention output splits into per-head sources is documented in ``_transformer``.
    - ``embed_multiplier``: the token embedding is ``W_E[t] * embed_multiplier`` (Gemma:
      ``sqrt(d_model)``, cast to the activation dtype as HF does); the unembedding uses ``W_E`` unscaled.
    - ``positional``: ``"learned"`` (``W_pos`` added to the embedding, part of the ``embed``
      source), ``"rotary"`` (applied to q and k inside attention; ``embed`` is the token embedding
      alone) or ``"none"``. Rotary: ``rotary_base`` (HF ``rope_theta``), ``rotary_dim`` (the
      leading dimensions of each head that rotate, in HF's half-split layout; ``None``: all),
      ``rope_scaling`` (``None``, ``("linear", factor)`` or ``("llama3", factor, low_freq_factor,
      high_freq_factor, original_max_position_embeddings)``).
    - ``n_kv_heads``: key/value heads (grouped-query attention; query head h reads kv head
      ``h // (n_heads / n_kv_heads)``, as HF's ``repeat_kv``); ``None``: ``n_heads``.
    - ``qk_norm``: an RMSNorm over each head's q and k before the rotation (Qwen3).
    - ``gated_mlp``: ``W_out (act(x W_gate) * (x W_in))`` (Llama's SiLU MLP) instead of ``W_out act(x W_in)``.
    - ``parallel``: attention and MLP read the same residual (GPT-NeoX/Pythia): the MLP has no edges
      from its own layer's heads.
    - ``sliding_window``: a query at i reads keys j with ``i - j < sliding_window``: one int for every
      layer (Mistral), a tuple of one int or ``None`` (full attention) per layer (Gemma-2's alternating
      layers, Qwen2/3's ``max_window_layers``), or ``None``: all keys everywhere. ``layer_windows``
      gives the per-layer tuple.
    - ``attn_softcap``: attention scores (after the scale) become ``tanh(s / cap) * cap`` before the
      mask and softmax; ``logit_softcap``: the same on the output logits (Gemma-2). ``None``: off.
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int | None = None
    d_vocab_out: int | None = None
    act_fn: str = "gelu_new"  # one of ActFn; validated in __post_init__ with a message
    normalization: str | None = "ln"  # "ln", "rms", "gemma_rms" or None
    ln_eps: float = 1e-5
    causal: bool = True
    attn_scale: float | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    tied_unembed: bool = True
    positional: str = "learned"  # "learned", "rotary" or "none"
    rotary_base: float = 10000.0
    rotary_dim: int | None = None
    rope_scaling: tuple | None = None
    n_kv_heads: int | None = None
    qk_norm: bool = False
    gated_mlp: bool = False
    parallel: bool = False
    sliding_window: int | tuple[int | None, ...] | None = None
    post_norms: bool = False
    embed_multiplier: float = 1.0
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    name: str = ""

    def __post_init__(self):
        for field in ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"TransformerConfig.{field} must be a positive int, got {value!r}")
        if self.d_mlp is not None and (not isinstance(self.d_mlp, int) or self.d_mlp <= 0):
            raise ConfigError(f"TransformerConfig.d_mlp must be a positive int or None, got {self.d_mlp!r}")
        if self.d_vocab_out is None:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        if self.act_fn not in ("gelu_new", "gelu", "relu", "silu"):
            raise ConfigError(
                f"unknown act_fn {self.act_fn!r}; choose one of 'gelu_new', 'gelu', 'relu', 'silu'"
            )
        if self.normalization not in ("ln", "rms", "gemma_rms", None):
            raise ConfigError(f"normalization must be 'ln', 'rms', 'gemma_rms' or None, got {self.normalization!r}")
        if self.post_norms and self.normalization not in ("rms", "gemma_rms"):
            raise ConfigError(
                f"post_norms needs an RMS norm (normalization='rms' or 'gemma_rms'), got {self.normalization!r}: "
                "a LayerNorm after a sublayer has no per-head decomposition here"
            )
        if self.positional not in ("learned", "rotary", "none"):
            raise ConfigError(f"positional must be 'learned', 'rotary' or 'none', got {self.positional!r}")
        # n_kv_heads stays None when unset (not filled in), so that dataclasses.replace(n_heads=...) works
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads
        ):
            raise ConfigError(f"n_kv_heads must be a positive divisor of n_heads={self.n_heads}, got {self.n_kv_heads!r}")
        if self.positional == "rotary":
            if self.rotary_dim is None:
                object.__setattr__(self, "rotary_dim", self.d_head)
            if not isinstance(self.rotary_dim, int) or not 0 < self.rotary_dim <= self.d_head or self.rotary_dim % 2:
                raise ConfigError(f"rotary_dim must be an even int in (0, d_head={self.d_head}], got {self.rotary_dim!r}")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
            kind = self.rope_scaling[0] if self.rope_scaling else None
            if not ((kind == "linear" and len(self.rope_scaling) == 2) or (kind == "llama3" and len(self.rope_scaling) == 5)):
                raise ConfigError(
                    "rope_scaling must be None, ('linear', factor) or ('llama3', factor, low_freq_factor, "
                    f"high_freq_factor, original_max_position_embeddings), got {self.rope_scaling!r}"
                )
        if isinstance(self.sliding_window, list):  # JSON gives lists
            object.__setattr__(self, "sliding_window", tuple(self.sliding_window))
        windows = self.sliding_window if isinstance(self.sliding_window, tuple) else (self.sliding_window,)
        if isinstance(self.sliding_window, tuple) and len(windows) != self.n_layers:
            raise ConfigError(f"sliding_window as a tuple needs one entry per layer ({self.n_layers}), got {len(windows)}")
        if not all(w is None or (isinstance(w, int) and not isinstance(w, bool) and w > 0) for w in windows):
            raise ConfigError(
                f"sliding_window must be a positive int, a tuple of positive ints or None per layer, or None; got {self.sliding_window!r}"
            )
        for field in ("attn_softcap", "logit_softcap"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"{field} must be a positive number or None, got {value!r}")
        if not isinstance(self.embed_multiplier, (int, float)) or isinstance(self.embed_multiplier, bool):
            raise ConfigError(f"embed_multiplier must be a number, got {self.embed_multiplier!r}")
        if self.gated_mlp and not self.has_mlp:
            raise ConfigError("gated_mlp needs an MLP (d_mlp is None)")
        if self.attn_scale is None:
            object.__setattr__(self, "attn_scale", math.sqrt(self.d_head))
        if self.tied_unembed and self.d_vocab_out != self.d_vocab:
            raise ConfigError(
                f"tied_unembed needs d_vocab_out == d_vocab (got {self.d_vocab_out} != {self.d_vocab}); "
                "set tied_unembed=False and give an explicit W_U"
            )

    @property
    def has_mlp(self) -> bool:
        return self.d_mlp is not None

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (``None``: full attention)."""
        if isinstance(self.sliding_window, tuple):
            return self.sliding_window
        return (self.sliding_window,) * self.n_layers

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.kv_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` without grouped-query attention."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def rotary_inv_freq(self):
        """The rotary inverse frequencies ``[rotary_dim / 2]`` (float64), HF's ``inv_freq`` with its scaling."""
        import numpy as np

        dim = self.rotary_dim
        inv = 1.0 / self.rotary_base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        if self.rope_scaling is None:
            return inv
        if self.rope_scaling[0] == "linear":
            return inv / self.rope_scaling[1]
        _, factor, low, high, old_len = self.rope_scaling
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled)

    @property
    def n_sources(self) -> int:
        """Sources of the computational graph: embed, every head, every MLP."""
        return 1 + self.n_layers * (self.n_heads + int(self.has_mlp))

    def layer_attn_scale(self, layer: int) -> float:
        scale = float(self.attn_scale)
        return scale * (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale

    @classmethod
    def gpt2(cls, size: str = "gpt2", **overrides) -> "TransformerConfig":
        """GPT-2 small (``"gpt2"``), ``"gpt2-medium"``, ``"gpt2-large"``, ``"gpt2-xl"`` or ``"distilgpt2"``."""
        if size not in GPT2_SHAPES:
            raise ConfigError(f"unknown GPT-2 size {size!r}; choose one of {sorted(GPT2_SHAPES)}")
        n_layers, n_heads, d_model = GPT2_SHAPES[size]
        kwargs = dict(
            n_layers=n_layers,
            n_heads=n_heads,
            d_model=d_model,
            d_head=d_model // n_heads,
            d_mlp=4 * d_model,
            d_vocab=50257,
            n_ctx=1024,
            act_fn="gelu_new",
            normalization="ln",
            causal=True,
            tied_unembed=True,
            name=size,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TransformerConfig fields {unknown}; known fields: {sorted(known)}")
        if data.get("rope_scaling") is not None:  # JSON gives lists
            data = {**data, "rope_scaling": tuple(data["rope_scaling"])}
        if isinstance(data.get("sliding_window"), list):
            data = {**data, "sliding_window": tuple(data["sliding_window"])}
        return cls(**data)

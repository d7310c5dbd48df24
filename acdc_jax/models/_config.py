"""The one configuration type for every model acdc-jax runs: GPT-2 family, compiled tracr, attention-only."""

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
    """Architecture of a decoder-style transformer with sequential attention then MLP in each block.

    Attention scores are ``q . k / attn_scale`` (GPT-2: ``attn_scale = sqrt(d_head)``, optionally
    times ``layer + 1`` when ``scale_attn_by_inverse_layer_idx``). ``d_mlp=None`` means an
    attention-only model. ``normalization=None`` means no LayerNorm anywhere (tracr).
    ``tied_unembed`` means the unembedding is ``W_E.T`` (GPT-2).
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
    normalization: str | None = "ln"  # "ln" or None
    ln_eps: float = 1e-5
    causal: bool = True
    attn_scale: float | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    tied_unembed: bool = True
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
        if self.normalization not in ("ln", None):
            raise ConfigError(f"normalization must be 'ln' or None, got {self.normalization!r}")
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
        return cls(**data)

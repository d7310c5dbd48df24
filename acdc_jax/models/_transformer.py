"""The transformer as a pure function of (params, gates, tokens).

Parameters are Equinox modules whose per-layer leaves are stacked on a leading layer axis, so the
layers run under one ``lax.scan``/``fori_loop`` and compile once. The ungated forward and the gated
forward share the block code (``_attention``, ``_mlp``); they differ only in how each block's inputs
are assembled: the ungated forward reads one residual stream, the gated forward builds every
destination input from the sources it is connected to (see ``gated_forward``).

Source order (the graph's and the caches'): ``embed``, then per layer the heads ``a{l}.0..H-1``
followed by ``mlp{l}`` (if the model has MLPs).

Norms after the sublayers (Gemma-2, ``config.post_norms``). The residual receives
``norm(sum_h y_h)`` for the heads' outputs ``y_h = z_h @ W_O[h]`` and ``norm(MLP(...))`` for the MLP.
The MLP is one source, so its source value is simply its normalised output. The heads are several,
and an RMSNorm is linear once its scale is fixed: ``norm(T) = T * c(T)`` with
``c(T) = (1 + w) / rms(T)`` (``w / rms(T)`` for a plain RMSNorm). Head h's source value is its share

    x_h = y_h * c(sum_h' y_h')        (summed over the heads of its layer, in the same run)

so the shares add up to the normalised output (exactly, up to float rounding), and the scale is
always that of the run which computed the heads: in the gated forward, ``sum_h' y_h'`` is the total
of the head outputs this run actually produced (each head from its own gated inputs), not the clean
run's. Edges carry the shares like any other source: a destination reads ``g x_h + (1 - g) x~_h``,
with ``x~_h`` the share in the ablated run (computed there with that run's own scale). Hence all
gates 1 gives the model (every head clean, so the total and the scale are the clean ones) and all
gates 0 the corrupted model (every destination reads the corrupted shares). Normalising each head
on its own would break the first (the norm of a sum is not the sum of norms); a scale frozen from
the clean run would make the residual differ from what the model writes for the heads this run
computed. A consequence to keep in mind: patching the inputs of one head changes the scale of its
whole layer, so the other heads' shares move too; that is the model's behaviour (the norm couples
them), not an artefact of the gating.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from ._config import TransformerConfig


class InputError(ValueError):
    """Inputs a model cannot take (token ids out of range, too long, wrong shape)."""


# --------------------------------------------------------------------------------------------
# Parameters


class LayerNorm(eqx.Module):
    """LayerNorm's scale and bias, or RMSNorm's scale (``b`` is None; Gemma's ``(1 + w)`` norm stores
    ``w``); the config says which."""

    w: Float[Array, "*layers d"]
    b: Float[Array, "*layers d"] | None = None


class Embed(eqx.Module):
    W_E: Float[Array, "d_vocab d_model"]
    W_pos: Float[Array, "n_ctx d_model"] | None  # None: no learned positions (rotary or none)


class Attention(eqx.Module):
    """Per-head weights in TransformerLens layout: ``q[h] = x @ W_Q[h] + b_Q[h]``.

    Keys and values have ``n_kv_heads`` heads (grouped-query attention); ``q_norm``/``k_norm`` are
    the per-head RMSNorm scales of models with q/k norm (Qwen3), else None. ``b_O`` is None in models
    with a norm after attention (``config.post_norms``): the bias would sit inside the norm.
    """

    W_Q: Float[Array, "*layers n_heads d_model d_head"]
    b_Q: Float[Array, "*layers n_heads d_head"]
    W_K: Float[Array, "*layers n_kv_heads d_model d_head"]
    b_K: Float[Array, "*layers n_kv_heads d_head"]
    W_V: Float[Array, "*layers n_kv_heads d_model d_head"]
    b_V: Float[Array, "*layers n_kv_heads d_head"]
    W_O: Float[Array, "*layers n_heads d_head d_model"]
    b_O: Float[Array, "*layers d_model"] | None = None
    q_norm: Float[Array, "*layers d_head"] | None = None
    k_norm: Float[Array, "*layers d_head"] | None = None


class MLP(eqx.Module):
    """``W_out act(x W_in + b_in) + b_out``, or with ``W_gate`` (gated MLP)
    ``W_out (act(x W_gate + b_gate) * (x W_in + b_in)) + b_out``."""

    W_in: Float[Array, "*layers d_model d_mlp"]
    b_in: Float[Array, "*layers d_mlp"]
    W_out: Float[Array, "*layers d_mlp d_model"]
    b_out: Float[Array, "*layers d_model"]
    W_gate: Float[Array, "*layers d_model d_mlp"] | None = None
    b_gate: Float[Array, "*layers d_mlp"] | None = None


class Block(eqx.Module):
    """One transformer block; in ``Transformer.blocks`` every leaf has a leading layer axis.

    ``ln1``/``ln2`` normalise the attention's and the MLP's input; ``ln1_post``/``ln2_post`` (Gemma-2's
    ``post_attention_layernorm``/``post_feedforward_layernorm``) their outputs, None without post norms.
    """

    ln1: LayerNorm | None
    attn: Attention
    ln2: LayerNorm | None
    mlp: MLP | None
    ln1_post: LayerNorm | None = None
    ln2_post: LayerNorm | None = None


class Unembed(eqx.Module):
    W_U: Float[Array, "d_model d_vocab_out"] | None  # None: tied to embed.W_E.T
    b_U: Float[Array, " d_vocab_out"]


class Transformer(eqx.Module):
    """A transformer's parameters; calling it on tokens ``[batch, pos]`` gives logits ``[batch, pos, vocab]``.

    ``precision`` is the matmul precision of every contraction. It defaults to ``"highest"`` so that
    results are fp32-exact on GPUs and TPUs too (their default runs fp32 matmuls in TF32/bf16);
    ``model.with_precision("default")`` trades that for speed.

    ``mesh``: the ``jax.sharding.Mesh`` whose ``model`` axis the weights are split over (set by
    ``acdc_jax.sharding.shard_model``; None on one device). The forwards then gather each layer's
    head outputs over that axis before they join the sources (``_heads_gathered``).
    """

    config: TransformerConfig = eqx.field(static=True)
    embed: Embed
    blocks: Block
    ln_final: LayerNorm | None
    unembed: Unembed
    precision: str = eqx.field(static=True, default="highest")
    mesh: object = eqx.field(static=True, default=None)

    def __call__(
        self,
        tokens: Int[Array | np.ndarray, "batch pos"],
        *,
        positions: Int[Array | np.ndarray, "batch k"] | None = None,
        pos_ids: Int[Array | np.ndarray, "*batch pos"] | None = None,
    ) -> Float[Array, "batch pos_or_k d_vocab_out"]:
        check_tokens(self.config, tokens)
        as_array = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
        return forward(self, jnp.asarray(tokens), positions=as_array(positions), pos_ids=as_array(pos_ids))

    def with_precision(self, precision: str) -> "Transformer":
        if precision not in ("highest", "high", "default"):
            raise ValueError(f"precision must be 'highest', 'high' or 'default', got {precision!r}")
        return eqx.tree_at(lambda m: m.precision, self, precision)

    def astype(self, dtype) -> "Transformer":
        """The same model with every floating-point parameter cast to ``dtype``.

        Activations follow the parameters' dtype: ``jnp.bfloat16`` gives bf16 activations (with
        LayerNorm statistics, softmax and metrics in float32), ``jnp.float64`` is for precision tests.
        """
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, self)

    @property
    def dtype(self):
        return self.embed.W_E.dtype

    @property
    def W_U(self) -> Float[Array, "d_model d_vocab_out"]:
        return self.embed.W_E.T if self.unembed.W_U is None else self.unembed.W_U


# --------------------------------------------------------------------------------------------
# Input checks (at the boundary, on concrete arrays only)


def check_tokens(config: TransformerConfig, tokens) -> None:
    """Raise ``InputError`` for tokens a model cannot read; does nothing on traced arrays."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise InputError(f"tokens must be an int array [batch, pos], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"tokens must be integer ids, got dtype {arr.dtype}")
    if arr.shape[1] > config.n_ctx:
        raise InputError(
            f"sequence length {arr.shape[1]} is longer than the model's n_ctx={config.n_ctx}; "
            "truncate the prompts"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= config.d_vocab):
        bad = np.argwhere((arr < 0) | (arr >= config.d_vocab))[0]
        raise InputError(
            f"token id {int(arr[tuple(bad)])} at [batch={bad[0]}, pos={bad[1]}] is out of range "
            f"for a vocabulary of {config.d_vocab}"
        )


# --------------------------------------------------------------------------------------------
# Pieces shared by both forwards


def _lead(v: Array, ndim: int) -> Array:
    """View a trailing-axis vector as broadcastable against an ``ndim`` array (explicit rank)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _at_least_f32(x: Array) -> Array:
    """Reductions (LayerNorm statistics, softmax) run in float32 even for bf16 activations."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _inverse_rms(x: Array, eps: float) -> Array:
    """``1 / sqrt(mean(x^2) + eps)`` over the last axis (kept), in at least float32."""
    wide = _at_least_f32(x)
    return lax.rsqrt((wide * wide).mean(-1, keepdims=True) + eps)


def _rms_scaled(ln: LayerNorm, x: Array, inverse_rms: Array, unit_offset: bool) -> Array:
    """``x * inverse_rms`` times the norm's scale: ``w`` applied after casting back to x's dtype (HF's
    ``LlamaRMSNorm``), or ``(1 + w)`` applied in float32 before casting (``Gemma2RMSNorm``)."""
    scaled = _at_least_f32(x) * inverse_rms
    if unit_offset:
        return (scaled * (1.0 + _lead(ln.w, x.ndim).astype(scaled.dtype))).astype(x.dtype)
    return scaled.astype(x.dtype) * _lead(ln.w, x.ndim)


def _layer_norm(ln: LayerNorm | None, x: Array, eps: float, unit_offset: bool = False) -> Array:
    """LayerNorm, or RMSNorm when ``ln.b`` is None (``x / sqrt(mean(x^2) + eps) * w``, statistics in
    float32; ``unit_offset``: Gemma's ``* (1 + w)``)."""
    if ln is None:
        return x
    wide = _at_least_f32(x)
    if ln.b is None:
        return _rms_scaled(ln, x, _inverse_rms(x, eps), unit_offset)
    mean = wide.mean(-1, keepdims=True)
    centred = wide - mean
    var = (centred * centred).mean(-1, keepdims=True)
    normed = (centred * lax.rsqrt(var + eps)).astype(x.dtype)
    return normed * _lead(ln.w, x.ndim) + _lead(ln.b, x.ndim)


def _norm(cfg: TransformerConfig, ln: LayerNorm | None, x: Array) -> Array:
    """The config's norm (``ln`` None: identity)."""
    return _layer_norm(ln, x, cfg.ln_eps, cfg.normalization == "gemma_rms")


def _post_norm_shares(cfg: TransformerConfig, ln: LayerNorm, parts: Float[Array, "n batch pos d_model"]) -> Array:
    """Each part's share of ``norm(sum(parts))``: ``parts[i] * c`` with the norm's scale
    ``c = (1 + w) / rms(total)`` (``w / rms(total)``) taken from the total, so the shares sum to the
    normalised total (see the module docstring for why heads after a post norm are defined so)."""
    inverse_rms = _inverse_rms(parts.sum(0), cfg.ln_eps)[None]
    return _rms_scaled(ln, parts, inverse_rms, cfg.normalization == "gemma_rms")


def _softcap(x: Array, cap: float | None) -> Array:
    """``tanh(x / cap) * cap`` (Gemma-2's soft-capping); ``cap`` None: x unchanged."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def _activation(name: str, x: Array) -> Array:
    if name == "gelu_new":  # GPT-2's tanh approximation (also HF's gelu_pytorch_tanh)
        return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jnp.maximum(x, 0)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def _embed(model: Transformer, tokens: Array, pos_ids: Array | None) -> Float[Array, "batch pos d_model"]:
    n_pos = tokens.shape[1]
    tok = model.embed.W_E[tokens]
    if model.config.embed_multiplier != 1.0:  # Gemma: sqrt(d_model), rounded to the activation dtype as HF does
        tok = tok * jnp.asarray(model.config.embed_multiplier, tok.dtype)
    if model.embed.W_pos is None:  # rotary (positions enter at q and k) or no positions
        return tok
    if pos_ids is None:
        pos = model.embed.W_pos[:n_pos][None]
    else:
        pos = model.embed.W_pos[pos_ids]
        if pos.ndim == 2:
            pos = pos[None]
    return tok + pos


def project_heads(cfg: TransformerConfig, block: Block, x: Array, W: Array, b: Array, precision) -> Array:
    """``LN1(x) @ W[h] + b[h]`` for every head, head-major ``[n_heads, batch, pos, d_head]``.

    ``x`` is one residual stream ``[batch, pos, d_model]`` shared by all heads or one input per head
    ``[n_heads, batch, pos, d_model]`` (the gated forward). Head-major output avoids a transpose that
    costs as much as the projection itself when the heads have separate inputs. Key/value weights
    with ``n_kv_heads < n_heads`` are repeated to one per query head (HF's ``repeat_kv``); keys or
    values with one input per key/value head ``[n_kv_heads, batch, pos, d_model]`` (grouped k/v
    gates) are projected per key/value head and the result repeated instead.
    """
    grouped_inputs = x.ndim == 4 and x.shape[0] == W.shape[0] != cfg.n_heads
    if W.shape[0] != cfg.n_heads and not grouped_inputs:
        W, b = jnp.repeat(W, cfg.kv_group, axis=0), jnp.repeat(b, cfg.kv_group, axis=0)
    x = _norm(cfg, block.ln1, x)
    spec = "bpd,hde->hbpe" if x.ndim == 3 else "hbpd,hde->hbpe"
    out = jnp.einsum(spec, x, W, precision=precision) + b[:, None, None, :]
    return jnp.repeat(out, cfg.kv_group, axis=0) if grouped_inputs else out


class Rotary(NamedTuple):
    """``cos`` and ``sin`` ``[batch or 1, pos, rotary_dim]`` of every position, HF's layout
    (each frequency twice: ``cat(f, f)``)."""

    cos: Array
    sin: Array


def rotary_tables(cfg: TransformerConfig, n_pos: int, pos_ids: Array | None, dtype) -> Rotary | None:
    """The rotation of a rotary model for positions ``pos_ids`` (default ``0..n_pos-1``); None otherwise."""
    if cfg.positional != "rotary":
        return None
    wide = jnp.promote_types(dtype, jnp.float32)  # float32 as HF computes them (float64 for float64 models)
    inv_freq = jnp.asarray(cfg.rotary_inv_freq(), wide)
    pos = jnp.arange(n_pos)[None] if pos_ids is None else jnp.asarray(pos_ids).reshape((-1, n_pos))
    angles = pos.astype(wide)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return Rotary(jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype))


def _rotate(x: Array, rot: Rotary) -> Array:
    """HF's ``apply_rotary_pos_emb`` on head-major ``[heads, batch, pos, d_head]``: the first
    ``rotary_dim`` dimensions rotate in two halves (``rotate_half``), the rest pass through."""
    dim = rot.cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    half = dim // 2
    turned = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * rot.cos[None] + turned * rot.sin[None]
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


def queries_keys(cfg: TransformerConfig, block: Block, q_in: Array, k_in: Array, rot: Rotary | None, precision,
                 q_rot: Rotary | None = None, offsets: tuple[Array, Array] | None = None):
    """Head-major queries and keys as attention scores read them: projected, q/k-normed (Qwen3),
    rotated (rotary models; ``q_rot``: the queries' own rotation when they sit at other positions
    than the keys). ``offsets``: (q, k) added to the projections (``SplitProbes``)."""
    attn = block.attn
    q = project_heads(cfg, block, q_in, attn.W_Q, attn.b_Q, precision)
    k = project_heads(cfg, block, k_in, attn.W_K, attn.b_K, precision)
    if offsets is not None:
        q, k = q + offsets[0], k + offsets[1]
    if attn.q_norm is not None:
        q = _norm(cfg, LayerNorm(attn.q_norm), q)
        k = _norm(cfg, LayerNorm(attn.k_norm), k)
    if rot is not None:
        q, k = _rotate(q, rot if q_rot is None else q_rot), _rotate(k, rot)
    return q, k


def attention_pattern(cfg: TransformerConfig, layer, q: Array, k: Array, precision,
                      q_positions: Array | None = None) -> Array:
    """Attention probabilities ``[n_heads, batch, q_pos, k_pos]`` from head-major queries and keys.

    Scores are ``q . k / attn_scale``, soft-capped (``attn_softcap``), then masked: causal, and with
    the layer's sliding window a query at i reads keys j with ``i - j < window`` (HF's
    ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``). ``layer`` may be traced.
    ``q_positions`` ``[batch, q_pos]``: the queries' positions when they are not ``0..k_pos-1``
    (the gated forward's last layer computes only the positions the metric reads).
    """
    scale = cfg.attn_scale
    if cfg.scale_attn_by_inverse_layer_idx:
        scale = scale * (jnp.asarray(layer) + 1).astype(q.dtype)
    scores = _softcap(jnp.einsum("hbqe,hbke->hbqk", q, k, precision=precision) / scale, cfg.attn_softcap)
    windows = cfg.layer_windows
    if cfg.causal or any(w is not None for w in windows):
        n = scores.shape[-1]
        if q_positions is None:
            i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        else:  # [batch, q, 1] against [1, 1, n]; the mask gets a batch axis
            i, j = jnp.asarray(q_positions)[:, :, None], jnp.arange(n)[None, None, :]
        allowed = (j <= i) if cfg.causal else (i - j < n + n)
        if len(set(windows)) == 1:  # one window (or none) for every layer: a constant mask
            if windows[0] is not None:
                allowed = allowed & (i - j < windows[0])
        else:  # per-layer windows, looked up by the (possibly traced) layer; i - j < n always holds
            table = jnp.asarray([n if w is None else w for w in windows])
            allowed = jnp.asarray(allowed) & (jnp.asarray(i - j) < table[layer])
        allowed = jnp.asarray(allowed)
        allowed = allowed[None, None] if allowed.ndim == 2 else allowed[None]
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(_at_least_f32(scores), axis=-1).astype(q.dtype)


def _attention(
    cfg: TransformerConfig,
    block: Block,
    layer: Array,
    q_in: Array,
    k_in: Array,
    v_in: Array,
    precision,
    pattern_offset: Array | None = None,
    rot: Rotary | None = None,
    q_positions: Array | None = None,
    qkv_offsets: tuple[Array, Array, Array] | None = None,
) -> Float[Array, "n_heads batch pos d_head"]:
    """One layer's attention up to the mixed values ``z`` (head-major).

    Inputs are one residual stream ``[batch, pos, d_model]`` shared by all heads or one input per
    head ``[n_heads, batch, pos, d_model]``. ``pattern_offset`` is added to the probabilities (a
    probe whose gradient is d loss / d pattern; zero in value). ``rot``: the rotary tables.
    ``q_positions`` ``[batch, k]``: the queries are at these positions only (``q_in`` has ``k``
    positions, keys and values every position). ``qkv_offsets``: added to the projected queries,
    keys and values (per query head; ``SplitProbes``).
    """
    attn = block.attn
    q_rot = None if rot is None or q_positions is None else Rotary(*(_at_positions(t, q_positions) for t in rot))
    q, k = queries_keys(cfg, block, q_in, k_in, rot, precision, q_rot, None if qkv_offsets is None else qkv_offsets[:2])
    v = project_heads(cfg, block, v_in, attn.W_V, attn.b_V, precision)
    if qkv_offsets is not None:
        v = v + qkv_offsets[2]
    pattern = attention_pattern(cfg, layer, q, k, precision, q_positions)
    if pattern_offset is not None:
        pattern = pattern + pattern_offset
    return jnp.einsum("hbqk,hbke->hbqe", pattern, v, precision=precision)


def _head_sources(cfg: TransformerConfig, block: Block, results: Float[Array, "n_heads batch pos d_model"]) -> Array:
    """Each head's source value from its output ``z_h @ W_O[h]``: the output itself, or with a norm
    after attention (Gemma-2) its share of the normalised sum, the scale taken from these heads."""
    return results if block.ln1_post is None else _post_norm_shares(cfg, block.ln1_post, results)


def _attention_output(cfg: TransformerConfig, block: Block, summed: Float[Array, "batch pos d_model"]) -> Array:
    """What one layer's attention adds to the residual, from the sum of its heads' ``z_h @ W_O[h]``:
    plus ``b_O``, or normalised (post norm), as the model computes it."""
    if block.ln1_post is not None:
        return _norm(cfg, block.ln1_post, summed)
    return summed + _lead(block.attn.b_O, 3)


def _mlp(cfg: TransformerConfig, block: Block, x: Array, precision) -> Float[Array, "batch pos d_model"]:
    """The MLP's source value: its output, normalised when the model has post norms (one source, so
    the normalised output is all of it)."""
    mlp = block.mlp
    x = _norm(cfg, block.ln2, x)
    h = jnp.einsum("bpd,dm->bpm", x, mlp.W_in, precision=precision) + _lead(mlp.b_in, 3)
    if mlp.W_gate is None:
        h = _activation(cfg.act_fn, h)
    else:
        gate = jnp.einsum("bpd,dm->bpm", x, mlp.W_gate, precision=precision) + _lead(mlp.b_gate, 3)
        h = _activation(cfg.act_fn, gate) * h
    out = jnp.einsum("bpm,md->bpd", h, mlp.W_out, precision=precision) + _lead(mlp.b_out, 3)
    return _norm(cfg, block.ln2_post, out)


def _at_positions(x: Array, positions: Array) -> Array:
    """``x[..., b, positions[b, i], :]``: ``x`` ``[..., batch or 1, pos or 1, d]`` at ``positions``
    ``[batch, k]`` (an axis of size 1 broadcasts)."""
    if x.shape[-2] == 1:
        return x
    lead, batch = x.shape[:-3], positions.shape[0]
    x = jnp.broadcast_to(x, lead + (batch,) + x.shape[-2:])
    index = positions.reshape((1,) * len(lead) + positions.shape + (1,))
    return jnp.take_along_axis(x, index, axis=-2)


def _unembed(model: Transformer, x: Array, positions: Array | None) -> Array:
    if positions is not None:
        x = jnp.take_along_axis(x, positions[:, :, None], axis=1)
    x = _norm(model.config, model.ln_final, x)
    logits = jnp.einsum("bpd,dv->bpv", x, model.W_U, precision=model.precision)
    return _softcap(logits + _lead(model.unembed.b_U, 3), model.config.logit_softcap)


def _heads_gathered(model: Transformer, results: Float[Array, "n_heads batch pos d_model"]) -> Array:
    """One layer's head outputs, on a model split over heads (``model.mesh``), gathered over the head
    axis (the other axes as the compiler chooses): the sources buffer they are written into at a
    traced offset holds every head on every device. Left to itself, XLA's SPMD partitioner
    mis-partitions the backward pass of that write from head-split values under vmap (wrong gate
    gradients, measured on jax 0.10.2 on CPU devices; ``tests/test_sharding.py`` pins the fix)."""
    if model.mesh is None or dict(model.mesh.shape).get("model", 1) == 1:
        return results
    free = jax.sharding.PartitionSpec.UNCONSTRAINED
    spec = jax.sharding.PartitionSpec(None, *([free] * (results.ndim - 1)))
    return lax.with_sharding_constraint(results, jax.sharding.NamedSharding(model.mesh, spec))


def _block_at(model: Transformer, layer) -> Block:
    return jax.tree.map(lambda leaf: leaf[layer], model.blocks)


# --------------------------------------------------------------------------------------------
# Ungated forward


class Sources(NamedTuple):
    """Every source's output on one batch: ``values[s]`` in the graph's source order."""

    values: Float[Array, "n_sources batch pos d_model"]
    logits: Float[Array, "batch pos_or_k d_vocab_out"]


def forward(
    model: Transformer,
    tokens: Int[Array, "batch pos"],
    *,
    positions: Int[Array, "batch k"] | None = None,
    pos_ids: Array | None = None,
) -> Float[Array, "batch pos_or_k d_vocab_out"]:
    """The plain forward pass: one residual stream, no gates."""
    return _residual_forward(model, tokens, positions, pos_ids, collect=False)[0]


def run_with_sources(
    model: Transformer,
    tokens: Int[Array, "batch pos"],
    *,
    positions: Int[Array, "batch k"] | None = None,
    pos_ids: Array | None = None,
) -> Sources:
    """The plain forward pass, also returning every source's output (heads without ``b_O``)."""
    logits, values = _residual_forward(model, tokens, positions, pos_ids, collect=True)
    return Sources(values=values, logits=logits)


def attention_patterns(
    model: Transformer,
    tokens: Int[Array | np.ndarray, "batch pos"],
    *,
    pos_ids: Int[Array | np.ndarray, "*batch pos"] | None = None,
) -> Float[Array, "n_layers batch n_heads q_pos k_pos"]:
    """Every head's attention probabilities on a plain forward pass: ``[layer, batch, head, query, key]``.

    Row ``[l, b, h, i]`` is the softmax over keys of head ``a{l}.{h}`` at query position i (zero
    on future keys in a causal model). Each layer's input is rebuilt from ``run_with_sources``
    (embed + every earlier source + earlier ``b_O``, as ``Ablation.from_values`` sums it), so it
    equals the forward's residual stream up to float summation order.
    """
    check_tokens(model.config, tokens)
    tokens = jnp.asarray(tokens)
    pos_ids = None if pos_ids is None else jnp.asarray(pos_ids)
    cfg = model.config
    # Reading one position is enough: only the sources matter here, not the logits.
    first = jnp.zeros((tokens.shape[0], 1), jnp.int32)
    values = run_with_sources(model, tokens, positions=first, pos_ids=pos_ids).values
    layer_inputs = Ablation.from_values(model, values).base_attn

    rot = rotary_tables(cfg, tokens.shape[1], pos_ids, model.dtype)

    def one_layer(block, layer, x):
        q, k = queries_keys(cfg, block, x, x, rot, model.precision)
        return jnp.swapaxes(attention_pattern(cfg, layer, q, k, model.precision), 0, 1)  # [batch, head, q, k]

    return jax.vmap(one_layer)(model.blocks, jnp.arange(cfg.n_layers), layer_inputs)


class SplitProbes(NamedTuple):
    """Zero offsets on the plain forward whose gradients give every destination input's cotangent
    (``models._split.split_pullback``): ``q``/``k``/``v`` ``[n_layers, n_heads, batch, pos, d_head]`` are
    added to each head's projected queries, keys and values (per query head, before q/k norms and
    rotation), ``mlp`` ``[n_layers, batch, pos, d_model]`` to each MLP's input residual (before its
    norm), ``final`` ``[batch, pos, d_model]`` to the unembedding's input; ``pattern`` (optional)
    ``[n_layers, n_heads, batch, pos, pos]`` to every head's attention probabilities."""

    q: Array
    k: Array
    v: Array
    mlp: Array | None
    final: Array
    pattern: Array | None = None

    @classmethod
    def zeros(cls, cfg: TransformerConfig, batch: int, n_pos: int, dtype, pattern: bool = False) -> "SplitProbes":
        heads = jnp.zeros((cfg.n_layers, cfg.n_heads, batch, n_pos, cfg.d_head), dtype)
        residual = jnp.zeros((batch, n_pos, cfg.d_model), dtype)
        mlp = jnp.broadcast_to(residual, (cfg.n_layers,) + residual.shape) if cfg.has_mlp else None
        probs = jnp.zeros((cfg.n_layers, cfg.n_heads, batch, n_pos, n_pos), dtype) if pattern else None
        return cls(q=heads, k=heads, v=heads, mlp=mlp, final=residual, pattern=probs)


class Mixture(NamedTuple):
    """Every gate at one value ``alpha``: each source writes ``x~_s + alpha (x_s - x~_s)`` into one
    residual stream (``ablation.values`` are the ``x~_s``; ``b_O`` is written as the gated forward's
    base has it). This is the gated model at gates ``alpha`` on a graph in which every input reads
    every earlier source: all of a layer's inputs are then the same residual."""

    alpha: Array
    ablation: "Ablation"


class Collected(NamedTuple):
    """What ``_residual_forward`` collects beside the logits with a ``Mixture`` or probes: every
    source's value in this run ``[n_sources, batch, pos, d_model]`` and each layer's attention input
    ``[n_layers, batch, pos, d_model]`` (where its norm's vjp is taken)."""

    values: Array
    attn_in: Array


def _residual_forward(model, tokens, positions, pos_ids, collect: bool, probes: SplitProbes | None = None,
                      mixture: Mixture | None = None, drop_layer: int | Array = -1):
    """The one-residual forward: the plain model, or with ``mixture`` every gate at one value; with
    ``probes`` the offsets of ``SplitProbes`` are added (zero in value). ``drop_layer``: no gradient
    flows through what that layer writes into the residual (GradDrop; -1: none). Returns the logits
    and, with ``collect`` (implied by probes or a mixture), ``Collected``."""
    cfg = model.config
    precision = model.precision
    H = cfg.n_heads
    inputs_too = probes is not None or mixture is not None
    collect = collect or inputs_too
    x = _embed(model, tokens, pos_ids)
    embed_out = x
    rot = rotary_tables(cfg, tokens.shape[1], pos_ids, x.dtype)
    if mixture is not None:
        ablated = mixture.ablation.values
        alpha = jnp.asarray(mixture.alpha, x.dtype)
        x = ablated[0] + alpha * (embed_out - ablated[0])

    def written(values, first, n):
        """What sources ``first .. first + n - 1`` write into the residual at the mixture (summed)."""
        before = lax.dynamic_slice_in_dim(ablated, first, n, axis=0)
        return (before + alpha * (values - before)).sum(0)

    def layer_step(x, inputs):
        block, layer, probe = inputs
        offsets = None if probes is None else (probe.q, probe.k, probe.v)
        pattern = None if probes is None else probe.pattern
        z = _attention(cfg, block, layer, x, x, x, precision, pattern, rot=rot, qkv_offsets=offsets)
        x_before = x
        first = 1 + layer * (H + int(cfg.has_mlp))
        # the residual gets the attention output as the model computes it (summed, then normed);
        # the per-head source values are collected beside it
        if mixture is not None:
            results = _heads_gathered(model, jnp.einsum("hbqe,hed->hbqd", z, block.attn.W_O, precision=precision))
            sources = _head_sources(cfg, block, results)
            update = written(sources, first, H)
            if block.attn.b_O is not None:  # as Ablation.from_values writes it into the base
                update = update + _lead(block.attn.b_O, 3)
            x = x + _dropped(update, layer, drop_layer)
        else:
            # the heads' sum as its own contraction: XLA's CPU sum over the leading (head) axis of the
            # per-head outputs costs six times the projection
            update = _attention_output(cfg, block, jnp.einsum("hbqe,hed->bqd", z, block.attn.W_O, precision=precision))
            x = x + _dropped(update, layer, drop_layer)
            if collect:
                results = _heads_gathered(model, jnp.einsum("hbqe,hed->hbqd", z, block.attn.W_O, precision=precision))
                sources = _head_sources(cfg, block, results)
        outs = [sources] if collect else []
        if cfg.has_mlp:
            mlp_in = x_before if cfg.parallel else x  # parallel: the same residual as the heads
            m = _mlp(cfg, block, mlp_in if probes is None else mlp_in + probe.mlp, precision)
            x = x + _dropped(m if mixture is None else written(m[None], first + H, 1), layer, drop_layer)
            if collect:
                outs.append(m[None])
        per_layer = jnp.concatenate(outs, axis=0) if collect else None
        return x, (per_layer, x_before) if inputs_too else per_layer

    layer_probes = None if probes is None else probes._replace(final=None)
    x, per_layer = lax.scan(layer_step, x, (model.blocks, jnp.arange(cfg.n_layers), layer_probes))
    logits = _unembed(model, x if probes is None else x + probes.final, positions)
    if not collect:
        return logits, None
    if inputs_too:
        per_layer, attn_in = per_layer
    values = jnp.concatenate([embed_out[None], per_layer.reshape((-1,) + per_layer.shape[2:])], axis=0)
    if not inputs_too:
        return logits, values
    return logits, Collected(values, attn_in)


# --------------------------------------------------------------------------------------------
# Gated forward


class DenseGates(NamedTuple):
    """Gates laid out per destination over all sources; zero wherever there is no edge.

    Without a position axis: ``attn [L, n_in, S]``, ``mlp [L, S]``, ``logits [S]``, where ``n_in`` is
    ``3 * n_heads`` (rows ``3h + 0|1|2`` are head h's q|k|v inputs), ``n_heads`` (one input per head)
    or ``n_heads + 2 * n_kv_heads`` (k/v per key/value head: rows ``h`` are the queries, rows
    ``n_heads + 2j + 0|1`` group j's k|v inputs).
    With per-position gates a destination-position axis ``P`` follows the layer axis:
    ``attn [L, P, n_in, S]``, ``mlp [L, P, S]``, ``logits [P, S]``.
    """

    attn: Array
    mlp: Array | None
    logits: Array


class Ablation(eqx.Module):
    """What a gate at 0 interpolates towards: an ablated value for every source.

    ``values[s]`` is source s's ablated output (the corrupted run's, zeros or a mean); batch and
    position axes may be 1 (broadcast). ``base_*`` are the destination inputs when every incoming
    gate is 0: the ablated values of all earlier sources plus the constant ``b_O`` of earlier
    attention layers, precomputed once.
    """

    values: Float[Array, "n_sources batch pos d_model"]
    base_attn: Float[Array, "n_layers batch pos d_model"]
    base_mlp: Float[Array, "n_layers batch pos d_model"] | None
    base_logits: Float[Array, "batch pos d_model"]

    def rows(self, index) -> "Ablation":
        """The ablation for a subset of prompts (axes broadcast over the batch stay as they are)."""

        def take(x, axis):
            return x if x is None or x.shape[axis] == 1 else jnp.take(x, jnp.asarray(index), axis=axis)

        return Ablation(take(self.values, 1), take(self.base_attn, 1), take(self.base_mlp, 1), take(self.base_logits, 0))

    @classmethod
    def from_values(cls, model: Transformer, values: Array) -> "Ablation":
        cfg = model.config
        L, H, M = cfg.n_layers, cfg.n_heads, int(cfg.has_mlp)
        if values.shape[0] != cfg.n_sources or values.ndim != 4 or values.shape[-1] != cfg.d_model:
            raise InputError(
                f"ablation values must have shape [n_sources={cfg.n_sources}, batch, pos, "
                f"d_model={cfg.d_model}], got {values.shape}"
            )
        per_layer = values[1:].reshape((L, H + M) + values.shape[1:])
        heads = per_layer[:, :H].sum(1)
        if model.blocks.attn.b_O is not None:  # None with post norms: the heads' shares are all of it
            heads = heads + model.blocks.attn.b_O.reshape((L, 1, 1, cfg.d_model))
        layer_total = heads + per_layer[:, H] if M else heads
        before = jnp.cumsum(layer_total, axis=0)
        start = values[0][None]
        base_attn = jnp.concatenate([start, start + before[:-1]], axis=0)
        base_mlp = (base_attn if cfg.parallel else base_attn + heads) if M else None  # parallel: not its own heads
        base_logits = values[0] + before[-1]
        return cls(values=values, base_attn=base_attn, base_mlp=base_mlp, base_logits=base_logits)


def layer_segments(n_layers: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges, each run as one loop whose layers read a fixed prefix of the sources.

    One loop over all layers would make every layer's gated read span every source, half of them
    not computed yet; one loop per layer compiles a body per layer. About three layers per segment
    (at most six segments) keeps most of the saving at a few compiled bodies.
    """
    n_segments = max(1, min(6, math.ceil(n_layers / 3)))
    bounds = np.linspace(0, n_layers, n_segments + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class Probes(NamedTuple):
    """Extras of the gated forward that gradient methods differentiate through (zero effect in value
    unless set): ``ghost`` gates reading a fixed difference buffer ``ghost_deltas`` (their gradient is
    ``ghost_deltas[s] . d loss / d in_d``), ``pattern_offset`` ``[n_layers, n_heads, batch, pos, pos]``
    added to every attention pattern (its gradient is d loss / d pattern), ``embed_scale`` scaling
    the embedding's difference (the run reads ``x~ + a (x - x~)`` for ``embed``), and ``drop_layer``,
    whose heads' and MLP's outputs are constants for the backward pass (GradDrop; -1: none)."""

    ghost: DenseGates | None = None
    ghost_deltas: Array | None = None
    pattern_offset: Array | None = None
    embed_scale: Array | float = 1.0
    drop_layer: Array | int = -1


def _dropped(x: Array, layer, drop_layer) -> Array:
    """``x``, with a zero cotangent where ``layer == drop_layer`` (GradDrop; -1: none). Its value never
    depends on ``drop_layer``, so under ``vmap`` over drop layers the forward stays one unbatched
    pass and only the backward is batched (AtP*: one forward for every drop)."""
    if isinstance(drop_layer, int) and drop_layer < 0:
        return x
    return _kept_gradient(x, layer != drop_layer)


@jax.custom_vjp
def _kept_gradient(x: Array, keep: Array) -> Array:
    return x


def _kept_gradient_fwd(x, keep):
    return x, keep


def _kept_gradient_bwd(keep, ct):
    return jnp.where(keep, ct, jnp.zeros_like(ct)), None


_kept_gradient.defvjp(_kept_gradient_fwd, _kept_gradient_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shared_rows_read(gates: Array, buffer: Array, precision) -> Array:
    """``einsum("(p)ds,sbpm->dbpm", gates, buffer)`` for gates whose rows ``d`` are all equal.

    The forward reads one row and broadcasts it to every input (one residual per layer, as the
    plain model has); the backward is the dense read's, exactly: ``d/dgates[(p,) d, s] =
    buffer[s] . ct[d]`` for every row, and ``d/dbuffer[s] = row[s] * sum_d ct[d]``. Exact only
    when the rows are equal: callers check that on the concrete gates (``rows_shared``).
    """
    return _shared_rows_forward(gates, buffer, precision)


def _shared_rows_forward(gates, buffer, precision):
    per_position = gates.ndim == 3
    row = gates[:, 0] if per_position else gates[0]
    one = jnp.einsum("ps,sbpm->bpm" if per_position else "s,sbpm->bpm", row, buffer, precision=precision)
    n_in = gates.shape[-2]
    return jnp.broadcast_to(one[None], (n_in,) + one.shape)


def _shared_rows_fwd(gates, buffer, precision):
    return _shared_rows_forward(gates, buffer, precision), (gates, buffer)


def _shared_rows_bwd(precision, residuals, ct):
    gates, buffer = residuals
    per_position = gates.ndim == 3
    row = gates[:, 0] if per_position else gates[0]
    d_gates = jnp.einsum("sbpm,dbpm->pds" if per_position else "sbpm,dbpm->ds", buffer, ct, precision=precision)
    d_buffer = jnp.einsum("ps,bpm->sbpm" if per_position else "s,bpm->sbpm", row, ct.sum(0), precision=precision)
    return d_gates.astype(gates.dtype), d_buffer.astype(buffer.dtype)


shared_rows_read.defvjp(_shared_rows_fwd, _shared_rows_bwd)


def _remat_layers(segments, rows_per_layer: int, deltas: Array) -> Array:
    """The layer loops ``lax.fori_loop(lower, upper, step, deltas)`` of ``segments`` (``(lower,
    upper, step)`` in order), differentiated by recomputing each layer.

    Every layer writes its own sources' rows of the difference buffer once and never touches the
    others, so the buffer a layer ``l`` read is the final buffer's rows below its own first source
    (``1 + l * rows_per_layer``) and the input buffer's rows from there on. The backward pass
    therefore keeps only the input and the output buffers and, from the top layer down, recomputes
    one layer from its rebuilt input to pull the cotangent through it: a reverse pass at one extra
    forward's cost whose memory does not grow with the number of layers (a scan's backward keeps
    every layer's buffer). The gradients are the scan's, to float rounding.
    """
    bounds, steps, n_consts, consts = [], [], [], []
    for lower, upper, step in segments:
        converted, closed = jax.closure_convert(step, jnp.int32(lower), deltas)
        bounds.append((lower, upper))
        steps.append(converted)
        n_consts.append(len(closed))
        consts.extend(closed)
    return _remat_loop(tuple(bounds), tuple(steps), tuple(n_consts), rows_per_layer, deltas, *consts)


def _split_consts(n_consts, consts):
    ends = np.cumsum((0,) + tuple(n_consts))
    return [consts[a:b] for a, b in zip(ends[:-1], ends[1:])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _remat_loop(bounds, steps, n_consts, rows_per_layer, deltas, *consts):
    for (lower, upper), step, closed in zip(bounds, steps, _split_consts(n_consts, consts)):
        deltas = lax.fori_loop(lower, upper, lambda layer, d, step=step, closed=closed:
                               step(layer.astype(jnp.int32), d, *closed), deltas)
    return deltas


def _remat_loop_fwd(bounds, steps, n_consts, rows_per_layer, deltas, *consts):
    # symbolic zeros: the backward differentiates only what the caller differentiates (weights
    # that are closed over but not differentiated get no weight-sized cotangent accumulators)
    values = tuple(c.value for c in consts)
    out = _remat_loop(bounds, steps, n_consts, rows_per_layer, deltas.value, *values)
    wanted = tuple(() if c.perturbed else None for c in consts)  # a pytree marker: () wanted, None not
    return out, (deltas.value, out, values, wanted)


def _remat_loop_bwd(bounds, steps, n_consts, rows_per_layer, residuals, ct):
    deltas, out, consts, wanted = residuals
    wanted = [w is not None for w in wanted]
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):
        ct = jnp.zeros(ct.shape, ct.dtype)
    source = jnp.arange(deltas.shape[0]).reshape((-1,) + (1,) * (deltas.ndim - 1))
    ct_consts = []
    for (lower, upper), step, closed, want in reversed(list(zip(
            bounds, steps, _split_consts(n_consts, consts), _split_consts(n_consts, wanted)))):
        closed, which = tuple(closed), [k for k, w in enumerate(want) if w]

        def back(i, carry, step=step, upper=upper, closed=closed, which=which):
            ct_deltas, ct_wanted = carry
            layer = (upper - 1 - i).astype(jnp.int32)
            seen = jnp.where(source < 1 + layer * rows_per_layer, out, deltas)  # the buffer this layer read

            def layer_of(d, *diff):
                c = list(closed)
                for k, v in zip(which, diff):
                    c[k] = v
                return step(layer, d, *c)

            _, pull = jax.vjp(layer_of, seen, *(closed[k] for k in which))
            grads = pull(ct_deltas)
            return grads[0], jax.tree.map(jnp.add, ct_wanted, tuple(grads[1:]))

        zeros = tuple(jnp.zeros_like(closed[k]) for k in which)
        ct, got = lax.fori_loop(0, upper - lower, back, (ct, zeros))
        got = dict(zip(which, got))
        ct_consts = [got.get(k) for k in range(len(closed))] + ct_consts
    return (ct, *ct_consts)


_remat_loop.defvjp(_remat_loop_fwd, _remat_loop_bwd, symbolic_zeros=True)



def _weighted_sum(g: Array, x: Array, precision) -> Array:
    """``sum_s g[(p,) s] * x[s]`` for rows ``x`` ``[n, batch or 1, pos or 1, d_model]`` and gates
    ``[n]`` or per position ``[pos, n]``."""
    if g.ndim == 1:
        return jnp.einsum("s,sbpm->bpm", g, x, precision=precision)
    if x.shape[2] == 1:  # one value for every position (zero or mean ablation)
        return jnp.einsum("ps,sbm->bpm", g, x[:, :, 0], precision=precision)
    return jnp.einsum("ps,sbpm->bpm", g, x, precision=precision)


def _node_stream_forward(model: Transformer, g: Array, ablation: Ablation, tokens, *, positions, pos_ids, start_layer,
                         deltas, pattern_offset, embed_scale, remat: bool) -> Array:
    """``gated_forward`` for node gates: every destination reads source s with the same gate ``g[s]``
    (``[n_sources]``, or ``[pos, n_sources]`` per position), so all destinations of a layer read one
    residual, and that residual is carried from layer to layer as the plain model carries its own::

        R_l = base_attn[l] + sum_{s before layer l} g_s (x_s - x~_s)
        R_{l+1} = R_l + sum_h (g_h x_h + (1 - g_h) x~_h) + b_O + g_m x_m + (1 - g_m) x~_m

    No difference buffer: the heads' gated sum is one contraction of the gate-scaled ``z`` with
    ``W_O`` (with a post norm, a second one of the plain ``z`` gives the scale), so a layer costs the
    plain layer plus a read of its own sources' ablated values. ``deltas``/``start_layer`` resume as
    in ``gated_forward`` (one read of the earlier sources' differences)."""
    cfg = model.config
    precision = model.precision
    L, H, M = cfg.n_layers, cfg.n_heads, int(cfg.has_mlp)
    ablated = ablation.values
    per_position = g.ndim == 2

    def head_scale(gh):  # gates of the layer's heads, shaped to scale z [H, batch, pos, d_head]
        return gh.T[:, None, :, None] if per_position else gh[:, None, None, None]

    def one_scale(gs):  # one source's gate (a scalar, or [pos]), shaped to scale [batch, pos, d_model]
        return gs[None, :, None] if per_position else gs

    if deltas is None:
        x = _embed(model, tokens, pos_ids)
        g = g.astype(x.dtype)
        x = ablated[0] + (one_scale(g[..., 0]) * embed_scale) * (x - ablated[0])
        n_pos = tokens.shape[1]
    else:
        g = g.astype(deltas.dtype)
        n_pos = deltas.shape[2]
        earlier = jnp.arange(cfg.n_sources) < 1 + jnp.asarray(start_layer) * (H + M)
        bases = jnp.concatenate([ablation.base_attn, ablation.base_logits[None]], axis=0)
        x = bases[start_layer] + _weighted_sum(jnp.where(earlier, g, 0), deltas, precision)
    rot = rotary_tables(cfg, n_pos, pos_ids, x.dtype)

    def heads_and_mlp(layer, block, x, x_kv, values, q_positions=None):
        """What layer ``layer`` adds to the residual ``x`` (keys and values from ``x_kv``; with
        ``q_positions``, ``x`` and ``values`` are the residual and the ablated values there)."""
        first = 1 + layer * (H + M)
        gs = lax.dynamic_slice_in_dim(g, first, H + M, axis=-1)
        gh = gs[..., :H]
        offset = None if pattern_offset is None else pattern_offset[layer]
        z = _attention(cfg, block, layer, x, x_kv, x_kv, precision, offset, rot, q_positions)
        W_O = block.attn.W_O
        gated = jnp.einsum("hbqe,hed->bqd", z * head_scale(gh), W_O, precision=precision)
        if block.ln1_post is not None:  # the shares' scale comes from the sum of the heads this run computed
            total = jnp.einsum("hbqe,hed->bqd", z, W_O, precision=precision)
            gated = _rms_scaled(block.ln1_post, gated, _inverse_rms(total, cfg.ln_eps),
                                cfg.normalization == "gemma_rms")
        else:
            gated = gated + _lead(block.attn.b_O, 3)
        heads = gated + _weighted_sum(1 - gh, lax.dynamic_slice_in_dim(values, first, H, axis=0), precision)
        if not M:
            return heads
        out = _mlp(cfg, block, x if cfg.parallel else x + heads, precision)
        ablated_mlp = lax.dynamic_index_in_dim(values, first + H, axis=0, keepdims=False)
        return heads + ablated_mlp + one_scale(gs[..., H]) * (out - ablated_mlp)

    def layer_step(layer, x):
        return x + heads_and_mlp(layer, _block_at(model, layer), x, x, ablated)

    if remat:
        layer_step = jax.checkpoint(layer_step)
    last = L - 1
    trim = positions is not None and not per_position and pattern_offset is None and positions.shape[1] < n_pos
    lower = start_layer if isinstance(start_layer, int) else jnp.clip(start_layer, 0, L)
    x = lax.fori_loop(lower, last if trim else L, layer_step, x)
    if not trim:
        return _unembed(model, x, positions)
    at = functools.partial(_at_positions, positions=positions)

    def last_layer(x):
        here = at(x)
        return here + heads_and_mlp(jnp.int32(last), _block_at(model, last), here, x, at(ablated), q_positions=positions)

    if isinstance(start_layer, int):
        final = last_layer(x) if start_layer <= last else at(x)
    else:
        final = lax.cond(start_layer <= last, last_layer, at, x)
    return _unembed(model, final, None)


@jax.custom_batching.custom_vmap
def _in_every_configuration(flag: Array) -> Array:
    """``flag`` itself; under ``vmap``, one flag for the whole batch: whether it holds in every
    configuration. A ``lax.cond`` on it stays a branch under vmap (a batched predicate would make
    vmap run both branches) and is exact whenever either branch is, which is what the gated
    forward's one-residual read needs: it is taken only when every configuration allows it."""
    return flag


@_in_every_configuration.def_vmap
def _in_every_configuration_vmap(axis_size, in_batched, flag):
    return (jnp.all(flag) if in_batched[0] else flag), False


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _shortcut(holds, cheap, exact, *args):
    """``exact(*args)``, computed as ``cheap(*args)`` where ``holds(*args)`` (a concrete flag, in every
    configuration of a vmapped batch) says the two agree, unless the call is differentiated: then
    it is ``exact`` itself, in value and derivative (no branch under ``grad``, so the gradients,
    and the memory of the backward pass, are exact's). The gated forward reads its carried clean
    residual instead of the difference buffer with this (``gated_forward``)."""
    return lax.cond(_in_every_configuration(holds(*args)), cheap, exact, *args)


@_shortcut.defjvp
def _shortcut_jvp(holds, cheap, exact, primals, tangents):
    return jax.jvp(exact, primals, tangents)


def rows_shared(dense: "DenseGates") -> bool:
    """Whether every input of each layer reads the same gate row (``shared_rows_read`` is exact)."""
    attn = np.asarray(dense.attn)
    return bool(np.array_equal(attn, np.broadcast_to(attn[..., :1, :], attn.shape)))


def gated_forward(
    model: Transformer,
    gates: DenseGates,
    ablation: Ablation,
    tokens: Int[Array, "batch pos"] | None = None,
    *,
    positions: Int[Array, "batch k"] | None = None,
    pos_ids: Array | None = None,
    start_layer: int | Array = 0,
    deltas: Float[Array, "n_sources batch pos d_model"] | None = None,
    return_deltas: bool = False,
    probes: Probes | None = None,
    reads: str = "dense",
    remat: bool = False,
):
    """The forward pass in which every destination input is a gate-weighted interpolation.

    For destination d and source s with gate ``g[d, s]``::

        in_d = sum_s g[d,s] * x_s + (1 - g[d,s]) * x~_s  (+ b_O of earlier layers)
             = base_d + sum_s g[d,s] * (x_s - x~_s)

    where ``x_s`` is source s in this run and ``x~_s = ablation.values[s]`` (after a post norm, a
    head's ``x_s`` is its share with this run's scale: see the module docstring). The differences
    ``delta_s = x_s - x~_s`` live in one buffer ``[n_sources, batch, pos, d_model]`` that each
    layer reads with one einsum and writes its own sources into.

    ``start_layer``/``deltas`` resume a run at a layer: ``deltas`` must hold the correct differences
    for every source before ``start_layer`` (ACDC passes the clean run's, since layers below the
    destination being pruned still see all gates at 1); the layers before it are not run. With a
    traced ``start_layer`` the loop is a ``while_loop`` (one compilation for every start layer,
    not reverse-differentiable); with a Python int it is a scan.

    ``reads`` says how each layer's attention inputs are read:

    - ``"dense"``: every input reads its own gate row (any gates);
    - ``"shared"``: a promise that every input of a layer reads the same gate row (and ghost row),
      as at all gates 1 of a graph whose inputs see every earlier source: the layer reads one
      residual and broadcasts it (``shared_rows_read``), while the gradient with respect to every
      row stays the dense read's (edge-level gradient methods at gates 1; ``rows_shared`` checks);
    - ``"single"``: node gates: every destination reads source s with one gate, the logits row's
      ``gates.logits[(p,) s]`` (a node graph's layout). The run then carries one residual from layer
      to layer, as the plain model does, with no difference buffer (``_node_stream_forward``); the
      gradient with respect to the dense gates lands on the logits row. With ``return_deltas``, ghost
      gates or GradDrop's ``drop_layer`` it keeps the buffer, each layer reading its first row.

    ``remat``: differentiate the layers by recomputing them (``_remat_layers``): the backward pass
    keeps two difference buffers instead of one per layer, for one more forward's work. Values and
    gradients are unchanged; it needs a Python int ``start_layer``.

    Returns the logits ``[batch, pos_or_k, d_vocab_out]``; with ``return_deltas`` also the final
    difference buffer, from which ``deltas[s] + ablation.values[s]`` is source s's output in this run.
    """
    cfg = model.config
    precision = model.precision
    H, M = cfg.n_heads, int(cfg.has_mlp)
    per_position = gates.logits.ndim == 2
    probes = probes or Probes()
    if reads not in ("dense", "shared", "single"):
        raise ValueError(f"reads must be 'dense', 'shared' or 'single', got {reads!r}")
    if remat and not isinstance(start_layer, int):
        raise ValueError("remat needs a Python int start_layer (a traced start runs a while_loop, which has no backward)")
    if deltas is None and tokens is None:
        raise ValueError("gated_forward needs tokens, or deltas to resume from")
    n_pos = tokens.shape[1] if deltas is None else deltas.shape[2]
    if per_position and gates.logits.shape[0] != n_pos:
        raise InputError(f"per-position gates have {gates.logits.shape[0]} positions, the batch has {n_pos}")
    if (reads == "single" and not return_deltas and probes.ghost is None and isinstance(probes.drop_layer, int)
            and probes.drop_layer < 0):
        return _node_stream_forward(model, gates.logits, ablation, tokens, positions=positions, pos_ids=pos_ids,
                                    start_layer=start_layer, deltas=deltas, pattern_offset=probes.pattern_offset,
                                    embed_scale=probes.embed_scale, remat=remat)

    if deltas is None:
        embed_out = _embed(model, tokens, pos_ids)
        batch, n_pos = tokens.shape
        deltas = jnp.zeros((cfg.n_sources, batch, n_pos, cfg.d_model), embed_out.dtype)
        deltas = deltas.at[0].set(probes.embed_scale * (embed_out - ablation.values[0]))
    rot = rotary_tables(cfg, n_pos, pos_ids, deltas.dtype)
    gates = jax.tree.map(lambda g: g.astype(deltas.dtype), gates)  # gates follow the activation dtype
    read = "pds,sbpm->dbpm" if per_position else "ds,sbpm->dbpm"
    read_one = "ps,sbpm->bpm" if per_position else "s,sbpm->bpm"
    if remat and not isinstance(probes.drop_layer, int):
        # as a float: jax.closure_convert (``_remat_layers``) hoists floating-point tracers only,
        # and an integer one closed over by the recomputed layers would escape its trace
        probes = probes._replace(drop_layer=jnp.asarray(probes.drop_layer, deltas.dtype))
    ghost = None if probes.ghost is None else jax.tree.map(lambda g: g.astype(deltas.dtype), probes.ghost)

    def gated_read(spec, layer_gates, ghost_gates, buffer, visible):
        if reads == "shared" and spec == read:
            def one(g, b):
                return shared_rows_read(g, b, precision)
        else:
            def one(g, b):
                return jnp.einsum(spec, g, b, precision=precision)
        out = one(layer_gates[..., :visible], buffer[:visible])
        if ghost_gates is not None:
            out = out + one(ghost_gates[..., :visible], probes.ghost_deltas[:visible])
        return out

    def inputs_of(rows, ghost_rows, buffer, base, visible):
        """A layer's q, k and v inputs from its gate rows, a difference buffer and the inputs' base."""
        if reads == "single":  # one residual for every input: the first row (all rows are equal)
            x = base + gated_read(read_one, rows[..., 0, :], None if ghost_rows is None else ghost_rows[..., 0, :],
                                  buffer, visible)
            return x, x, x
        inputs = _lead(base, 4) + gated_read(read, rows, ghost_rows, buffer, visible)
        if inputs.shape[0] == 3 * H:
            qkv = inputs.reshape((H, 3) + inputs.shape[1:])
            return qkv[:, 0], qkv[:, 1], qkv[:, 2]
        if inputs.shape[0] == H:
            return inputs, inputs, inputs
        if inputs.shape[0] == H + 2 * cfg.kv_heads and cfg.kv_heads < H:  # q per head, then k, v per kv head
            kv = inputs[H:].reshape((cfg.kv_heads, 2) + inputs.shape[1:])
            return inputs[:H], kv[:, 0], kv[:, 1]
        raise InputError(
            f"the gates give {inputs.shape[0]} attention inputs per layer; this model takes 3 * {H} (q/k/v per head), "
            f"{H} (one per head) or {H} + 2 * {cfg.kv_heads} (k/v per key/value head): build the graph from this model")

    # Beside the buffer the run carries the residual every input reads when all its gates are 1:
    # base + the sum of every earlier source's difference (the model's own residual stream in this
    # run). A layer whose inputs all read every earlier source at 1 (every layer at gates 1; the
    # layers a search has not pruned yet) reads it instead of the buffer and runs its attention and
    # MLP as the plain model does: one norm, one wide projection per q/k/v, no gated read
    # (``_shortcut``: a branch on the concrete gates, never under differentiation).
    carry_residual = reads == "dense" and ghost is None and not remat

    def reads_every_earlier_source(row_gates, n_earlier):
        ones = (jnp.arange(row_gates.shape[-1]) < n_earlier).astype(row_gates.dtype)
        return jnp.all(row_gates == _lead(ones, row_gates.ndim))

    def layer_z(layer, block, q_buffer, q_base, kv_buffer, kv_base, visible, resid, q_positions=None):
        """A layer's mixed values ``z``: queries read from ``q_buffer`` (at ``q_positions`` when given),
        keys and values from ``kv_buffer``; from the carried residual ``resid`` (every position)
        when every input reads every earlier source at 1."""
        ghost_rows = None if ghost is None else ghost.attn[layer]
        offset = None if probes.pattern_offset is None else probes.pattern_offset[layer]
        same = q_buffer is kv_buffer

        def dense(rows, q_buffer, q_base, kv_buffer, kv_base, block, offset, rot, layer, q_positions, resid):
            q_in, k_in, v_in = inputs_of(rows, ghost_rows, kv_buffer, kv_base, visible)
            if not same:
                q_in = inputs_of(rows, ghost_rows, q_buffer, q_base, visible)[0]
            return _attention(cfg, block, layer, q_in, k_in, v_in, precision, offset, rot, q_positions)

        def from_residual(rows, q_buffer, q_base, kv_buffer, kv_base, block, offset, rot, layer, q_positions, resid):
            q_in = resid if q_positions is None else _at_positions(resid, q_positions)
            return _attention(cfg, block, layer, q_in, resid, resid, precision, offset, rot, q_positions)

        def all_clean(rows, *args):
            return reads_every_earlier_source(rows, 1 + args[7] * (H + M))

        args = (gates.attn[layer], q_buffer, q_base, kv_buffer, kv_base, block, offset, rot, layer, q_positions, resid)
        if resid is None:
            return dense(*args)
        return _shortcut(all_clean, from_residual, dense, *args)

    def heads_and_mlp(layer, block, buffer, z, visible, ablated, base_mlp, resid):
        """The layer's heads (from their mixed values ``z``) and MLP, written into ``buffer``; with a
        carried residual ``resid``, also the residual after this layer."""
        first = 1 + layer * (H + M)
        # with a post norm, each head's share uses the scale of the heads this run computed
        results = _heads_gathered(model, jnp.einsum("hbqe,hed->hbqd", z, block.attn.W_O, precision=precision))
        sources = _dropped(_head_sources(cfg, block, results), layer, probes.drop_layer)
        heads = sources - lax.dynamic_slice_in_dim(ablated, first, H, axis=0)
        if resid is not None:  # what the heads add to the residual (their b_O is in the next base)
            resid_mid = resid + jnp.einsum("h,hbpd->bpd", jnp.ones((H,), sources.dtype), sources, precision=precision)
            if block.attn.b_O is not None:
                resid_mid = resid_mid + _lead(block.attn.b_O, 3)
        if not M:
            buffer = lax.dynamic_update_slice_in_dim(buffer, heads, first, axis=0)
            return buffer if resid is None else (buffer, resid_mid)
        # The MLP reads this layer's heads from `heads` and the earlier sources from the buffer as
        # the layer found it; the layer then writes its H + 1 rows at once. Reading the buffer after
        # writing the heads into it made XLA copy the whole buffer in every layer (6x the loop's cost).

        def read(mlp_gates, buffer, heads, base_mlp, resid_in, first):
            own = jnp.arange(mlp_gates.shape[-1]) - first
            earlier = jnp.where((own >= 0) & (own < H), jnp.zeros((), mlp_gates.dtype), mlp_gates)
            mlp_in = base_mlp + gated_read(read_one, earlier, None if ghost is None else ghost.mlp[layer], buffer,
                                           visible)
            return mlp_in + jnp.einsum(read_one, lax.dynamic_slice_in_dim(mlp_gates, first, H, axis=-1), heads,
                                       precision=precision)

        def all_clean(mlp_gates, *args):
            return reads_every_earlier_source(mlp_gates, args[-1] + (0 if cfg.parallel else H))

        resid_in = None if resid is None else (resid if cfg.parallel else resid_mid)
        args = (gates.mlp[layer], buffer, heads, base_mlp, resid_in, first)
        mlp_in = read(*args) if resid is None else _shortcut(all_clean, lambda *a: a[4], read, *args)
        out = _dropped(_mlp(cfg, block, mlp_in, precision), layer, probes.drop_layer)
        ablated_mlp = lax.dynamic_index_in_dim(ablated, first + H, axis=0, keepdims=False)
        buffer = lax.dynamic_update_slice_in_dim(buffer, jnp.concatenate([heads, (out - ablated_mlp)[None]], axis=0),
                                                 first, axis=0)
        return buffer if resid is None else (buffer, resid_mid + out)

    def layer_step(layer, carry, visible: int):
        # Layers of this segment read only the first `visible` sources: the rest are not computed yet.
        deltas, resid = carry if carry_residual else (carry, None)
        block = _block_at(model, layer)
        base = ablation.base_attn[layer]
        z = layer_z(layer, block, deltas, base, deltas, base, visible, resid)
        mlp_base = ablation.base_mlp[layer] if M else None
        return heads_and_mlp(layer, block, deltas, z, visible, ablation.values, mlp_base, resid)

    def final_input(logit_gates, deltas, base, resid):
        """What the unembedding reads: the gated sum of every source, or the carried residual."""
        def read(logit_gates, deltas, base, resid):
            return base + gated_read(read_one, logit_gates, None if ghost is None else ghost.logits, deltas,
                                     cfg.n_sources)

        if resid is None:
            return read(logit_gates, deltas, base, resid)
        return _shortcut(lambda g, *_: jnp.all(g == 1), lambda *a: a[3], read, logit_gates, deltas, base, resid)

    if carry_residual:
        if isinstance(start_layer, int) and start_layer == 0:
            resid = ablation.values[0] + deltas[0]
        else:  # resumed: the inputs' base plus every earlier source
            bases = jnp.concatenate([ablation.base_attn, ablation.base_logits[None]], axis=0)
            earlier = (jnp.arange(cfg.n_sources) < 1 + jnp.asarray(start_layer) * (H + M)).astype(deltas.dtype)
            resid = bases[start_layer] + jnp.einsum("s,sbpm->bpm", earlier, deltas, precision=precision)
        carry = (deltas, resid)
    else:
        carry = deltas

    # The last layer, when the metric reads a few positions and nothing else is asked of the run,
    # computes its queries, heads and MLP at those positions only (keys and values everywhere).
    last = cfg.n_layers - 1
    trim = (positions is not None and not return_deltas and not per_position and probes.pattern_offset is None
            and ghost is None and positions.shape[1] < n_pos)
    segments = []
    for lo, hi in layer_segments(cfg.n_layers):
        visible = min(cfg.n_sources, 1 + hi * (H + M))
        top = min(hi, last) if trim else hi
        lower = max(start_layer, lo) if isinstance(start_layer, int) else jnp.clip(start_layer, lo, top)
        step = functools.partial(layer_step, visible=visible)
        if not remat:
            carry = lax.fori_loop(lower, top, step, carry)
        elif top > lower:
            segments.append((lower, top, step))
    if segments:
        carry = _remat_layers(segments, H + M, carry)
    deltas, resid = carry if carry_residual else (carry, None)
    if not trim:
        logits = _unembed(model, final_input(gates.logits, deltas, ablation.base_logits, resid), positions)
        return (logits, deltas) if return_deltas else logits
    at = functools.partial(_at_positions, positions=positions)

    def last_layer(deltas, resid):
        read_here = at(deltas)
        block = _block_at(model, last)
        z = layer_z(jnp.int32(last), block, read_here, at(ablation.base_attn[last]), deltas, ablation.base_attn[last],
                    cfg.n_sources, resid, q_positions=positions)
        mlp_base = at(ablation.base_mlp[last]) if M else None
        out = heads_and_mlp(jnp.int32(last), block, read_here, z, cfg.n_sources, at(ablation.values), mlp_base,
                            None if resid is None else at(resid))
        return out if resid is not None else (out, None)

    def skip_it(deltas, resid):
        return at(deltas), None if resid is None else at(resid)

    if isinstance(start_layer, int):
        at_reads, resid = (last_layer if start_layer <= last else skip_it)(deltas, resid)
    else:
        at_reads, resid = lax.cond(start_layer <= last, last_layer, skip_it, deltas, resid)
    return _unembed(model, final_input(gates.logits, at_reads, at(ablation.base_logits), resid), None)

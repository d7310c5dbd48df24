"""Gate gradients at a uniform point from one residual stream, without the gated forward.

With every gate at one value ``alpha`` on a graph whose inputs read every earlier source, all inputs
of a layer are the same residual ``r_l`` (``alpha = 1``: the plain model). The gate of edge
``s -> d`` then has the gradient ``delta_s . d loss / d in_d`` (``delta_s = x_s - x~_s``), and the
cotangent of one destination input is the part of the residual's cotangent that flows through that
input alone: for head h's query input ``J_norm(r_l)^T (W_Q[h] dq_h)``, with ``dq_h`` the cotangent
of the head's projected queries. So the gradients of every gate cost one forward of one residual
stream with zero offsets on the projected q/k/v (``SplitProbes``), one backward of it (input
cotangents only, as the plain model's), each input's cotangent through its norm's Jacobian, and
one contraction with the source differences per layer: the floor of edge attribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ._transformer import (Ablation, DenseGates, LayerNorm, Mixture, SplitProbes, Transformer, TransformerConfig,
                           _at_least_f32, _inverse_rms, _lead, _residual_forward)


def input_cotangents(model: Transformer, block, dq: Array, dk: Array, dv: Array, n_in: int) -> Array:
    """The cotangents ``[n_in, batch, pos, d_model]`` of a layer's attention inputs (after the
    input norm, before its Jacobian), in the gated forward's row layout (``DenseGates``), from the
    cotangents of the projected queries, keys and values ``[n_heads, batch, pos, d_head]``.

    One batched contraction ``row r: d_r @ W_r^T`` over rows laid out as the inputs are (the small
    ``d_head`` sides are stacked, not the ``d_model`` outputs: stacking three per-kind results into
    the interleaved layout cost twice the contractions on XLA's CPU)."""
    cfg = model.config
    H, G = cfg.n_heads, cfg.kv_heads
    attn = block.attn

    def rows(*parts):  # interleave per-row parts [n, ...] -> [n * len(parts), ...]
        return jnp.stack(parts, axis=1).reshape((-1,) + parts[0].shape[1:])

    if n_in == H + 2 * G and G < H:  # k and v per key/value head: a group's heads share the input
        def grouped(d):
            return d.reshape((G, cfg.kv_group) + d.shape[1:]).sum(1)

        d_rows = jnp.concatenate([dq, rows(grouped(dk), grouped(dv))], axis=0)
        W_rows = jnp.concatenate([attn.W_Q, rows(attn.W_K, attn.W_V)], axis=0)
    else:
        def per_head(W):
            return W if W.shape[0] == H else jnp.repeat(W, cfg.kv_group, axis=0)

        W_K, W_V = per_head(attn.W_K), per_head(attn.W_V)
        if n_in == 3 * H:
            d_rows, W_rows = rows(dq, dk, dv), rows(attn.W_Q, W_K, W_V)
        elif n_in == H:  # one input per head: its q, k and v cotangents summed, as one contraction
            d_rows = jnp.concatenate([dq, dk, dv], axis=-1)
            W_rows = jnp.concatenate([attn.W_Q, W_K, W_V], axis=-1)
        else:
            raise ValueError(f"{n_in} attention inputs per layer do not fit a model with {H} heads and {G} "
                             "key/value heads")
    return jnp.einsum("nbpe,nde->nbpd", d_rows, W_rows, precision=model.precision)


def shared_norm_vjp(cfg: TransformerConfig, ln: LayerNorm | None, x: Array, cotangents: Array) -> Array:
    """The vjp of the config's input norm (``_norm``) at one input ``x`` ``[batch, pos, d_model]``
    for many cotangents ``[n, batch, pos, d_model]``: its statistics taken once from ``x``. With
    ``g = ct * scale`` and ``x_hat`` the normalised input, ``r`` its inverse scale::

        LayerNorm: r * (g - mean(g) - x_hat * mean(g * x_hat))      RMSNorm: r * (g - x_hat * mean(g * x_hat))

    (the vjp of one broadcast norm recomputed the statistics per cotangent and cost three times as
    much; vmapping one norm's vjp over the cotangents gave float32 results 5% off under jit, with
    jax 0.10.2 on CPU, correct eagerly and in float64)."""
    if ln is None:
        return cotangents
    wide = _at_least_f32(x)
    if ln.b is None:
        inverse = _inverse_rms(x, cfg.ln_eps)
        x_hat = wide * inverse
    else:
        centred = wide - wide.mean(-1, keepdims=True)
        inverse = lax.rsqrt((centred * centred).mean(-1, keepdims=True) + cfg.ln_eps)
        x_hat = centred * inverse
    scale = _lead(ln.w, x.ndim).astype(wide.dtype)
    if cfg.normalization == "gemma_rms":
        scale = 1.0 + scale
    g = _at_least_f32(cotangents) * scale[None]
    out = g - x_hat[None] * (g * x_hat[None]).mean(-1, keepdims=True)
    if ln.b is not None:
        out = out - g.mean(-1, keepdims=True)
    return (inverse[None] * out).astype(cotangents.dtype)


def split_pullback(
    model: Transformer,
    ablation: Ablation,
    tokens: Array,
    alpha: Array | None,
    *,
    n_in: int,
    positions: Array | None = None,
    per_position: bool = False,
    per_row: bool = False,
    pattern: bool = False,
    drop_layer: int | Array = -1,
):
    """The logits at every gate ``alpha`` (None: the plain model, exactly) and a function from a
    cotangent of those logits to the cotangent of the dense gates (``DenseGates`` of
    ``d loss / d gates[.., d, s]``) at that point.

    ``per_position``: the gates have a destination-position axis (``[L, P, n_in, S]``, ...).
    ``per_row``: one gradient per prompt, on a leading batch axis. Entries for sources a
    destination cannot read (later ones) are not zero; the graph's layout drops them
    (``Graph.dense`` places gates on edges only). ``pattern``: the function also returns
    ``d loss / d pattern`` ``[n_layers, n_heads, batch, q, k]`` (AtP*'s QK fix). ``drop_layer``: no
    gradient through what that layer writes (GradDrop; -1: none), as the gated forward's probe.
    """
    cfg = model.config
    batch, n_pos = tokens.shape
    mixture = None if alpha is None else Mixture(jnp.asarray(alpha, model.dtype), ablation)

    def run(probes):
        return _residual_forward(model, tokens, positions, None, True, probes, mixture, drop_layer)

    zeros = SplitProbes.zeros(cfg, batch, n_pos, model.dtype, pattern=pattern)
    logits, vjp, collected = jax.vjp(run, zeros, has_aux=True)
    deltas = collected.values - ablation.values
    spec = "nbpd,sbpd->" + ("b" if per_row else "") + ("p" if per_position else "") + "ns"
    S = cfg.n_sources

    def contract(grads):  # [n, batch, pos, d_model] with every source's difference: [(b,) (p,) n, S]
        # all sources, also those a layer cannot read yet: slicing the buffer to the visible ones
        # copies it, which cost more than the extra rows' arithmetic (XLA CPU)
        if per_row or per_position:
            return jnp.einsum(spec, grads, deltas, precision=model.precision)
        # one contracted axis: XLA's CPU dot over the three axes (batch, pos, d_model) is 4-5x slower;
        # and the [S, n] product is kept as computed: letting XLA fold the transpose into the dot
        # (an [n, S] output) made it 2.5x slower
        flat = jnp.einsum("sk,nk->sn", deltas.reshape(S, -1), grads.reshape(grads.shape[0], -1),
                          precision=model.precision)
        return lax.optimization_barrier(flat).T

    def pull(cotangent) -> DenseGates | tuple[DenseGates, Array]:
        (d,) = vjp(cotangent)

        def one(layer):
            block, x, dq, dk, dv, dm = layer
            cotangents = input_cotangents(model, block, dq, dk, dv, n_in)
            grads = shared_norm_vjp(cfg, block.ln1, x, cotangents)  # every input is the same residual x
            if dm is None:
                return contract(grads), None
            # the MLP's input (its probe sits before its norm) in the same pass over the sources
            both = contract(jnp.concatenate([grads, dm[None]], axis=0))
            return both[..., :-1, :], both[..., -1, :]

        attn, mlp = lax.map(one, (model.blocks, collected.attn_in, d.q, d.k, d.v, d.mlp))  # [L, (b,) (P,) n_in, S]
        final = contract(d.final[None])[..., 0, :]
        if per_row:  # the batch axis first, as one DenseGates per prompt
            attn, mlp = jnp.moveaxis(attn, 1, 0), None if mlp is None else jnp.moveaxis(mlp, 1, 0)
        gates = DenseGates(attn=attn, mlp=mlp, logits=final)
        return (gates, d.pattern) if pattern else gates

    return logits, pull

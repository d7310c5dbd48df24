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

from ._transformer import (Ablation, DenseGates, Mixture, SplitProbes, Transformer, _norm, _residual_forward,
                           layer_segments)


def input_cotangents(model: Transformer, block, dq: Array, dk: Array, dv: Array, n_in: int) -> Array:
    """The cotangents ``[n_in, batch, pos, d_model]`` of a layer's attention inputs (after the
    input norm, before its Jacobian), in the gated forward's row layout (``DenseGates``), from the
    cotangents of the projected queries, keys and values ``[n_heads, batch, pos, d_head]``."""
    cfg = model.config
    H, G = cfg.n_heads, cfg.kv_heads
    attn = block.attn

    def back(d, W):
        return jnp.einsum("hbpe,hde->hbpd", d, W, precision=model.precision)

    cq = back(dq, attn.W_Q)
    if n_in == H + 2 * G and G < H:  # k and v per key/value head: a group's heads share the input
        def grouped(d, W):
            return back(d.reshape((G, cfg.kv_group) + d.shape[1:]).sum(1), W)

        kv = jnp.stack([grouped(dk, attn.W_K), grouped(dv, attn.W_V)], axis=1)
        return jnp.concatenate([cq, kv.reshape((2 * G,) + kv.shape[2:])], axis=0)

    def per_head(W):
        return W if W.shape[0] == H else jnp.repeat(W, cfg.kv_group, axis=0)

    ck, cv = back(dk, per_head(attn.W_K)), back(dv, per_head(attn.W_V))
    if n_in == 3 * H:
        return jnp.stack([cq, ck, cv], axis=1).reshape((3 * H,) + cq.shape[1:])
    if n_in == H:
        return cq + ck + cv
    raise ValueError(f"{n_in} attention inputs per layer do not fit a model with {H} heads and {G} key/value heads")


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
):
    """The logits at every gate ``alpha`` (None: the plain model, exactly) and a function from a
    cotangent of those logits to the cotangent of the dense gates (``DenseGates`` of
    ``d loss / d gates[.., d, s]``) at that point.

    ``per_position``: the gates have a destination-position axis (``[L, P, n_in, S]``, ...).
    ``per_row``: one gradient per prompt, on a leading batch axis. Entries for sources a
    destination cannot read (later ones) are not zero; the graph's layout drops them
    (``Graph.dense`` places gates on edges only).
    """
    cfg = model.config
    batch, n_pos = tokens.shape
    mixture = None if alpha is None else Mixture(jnp.asarray(alpha, model.dtype), ablation)

    def run(probes):
        return _residual_forward(model, tokens, positions, None, True, probes, mixture)

    logits, vjp, collected = jax.vjp(run, SplitProbes.zeros(cfg, batch, n_pos, model.dtype), has_aux=True)
    deltas = collected.values - ablation.values
    spec = "nbpd,sbpd->" + ("b" if per_row else "") + ("p" if per_position else "") + "ns"
    H, M, S = cfg.n_heads, int(cfg.has_mlp), cfg.n_sources

    def contract(grads, visible):
        if per_row or per_position:
            return jnp.einsum(spec, grads, deltas[:visible], precision=model.precision)
        # one contracted axis: XLA's CPU dot over the three axes (batch, pos, d_model) is 4-5x slower
        flat = jnp.einsum("sk,nk->sn", deltas[:visible].reshape(visible, -1), grads.reshape(grads.shape[0], -1),
                          precision=model.precision)
        return flat.T

    def pad(x, visible):  # sources on the last axis, up to S
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, S - visible)])

    def pull(cotangent) -> DenseGates:
        (d,) = vjp(cotangent)
        attn_rows, mlp_rows = [], []
        for lo, hi in layer_segments(cfg.n_layers):
            visible = min(S, 1 + hi * (H + M))
            layers = (jax.tree.map(lambda leaf, lo=lo, hi=hi: leaf[lo:hi], model.blocks), collected.attn_in[lo:hi],
                      d.q[lo:hi], d.k[lo:hi], d.v[lo:hi], None if d.mlp is None else d.mlp[lo:hi])

            def one(layer, visible=visible):
                block, x, dq, dk, dv, dm = layer
                cotangents = input_cotangents(model, block, dq, dk, dv, n_in)
                # one norm per input, as the gated forward has them (elementwise work). Vmapping one
                # norm's vjp over the inputs instead gave float32 gradients 5% off under jit (jax
                # 0.10.2 on CPU; correct eagerly, in a Python loop, and in float64)
                _, norm_vjp = jax.vjp(lambda r: _norm(cfg, block.ln1, r), jnp.broadcast_to(x, cotangents.shape))
                (grads,) = norm_vjp(cotangents)
                attn = pad(contract(grads, visible), visible)
                return attn, None if dm is None else pad(contract(dm[None], visible), visible)

            attn, mlp = lax.map(one, layers)
            attn_rows.append(attn)
            mlp_rows.append(mlp)
        attn = jnp.concatenate(attn_rows, axis=0)  # [L, (b,) (P,) n_in, S]
        mlp = jnp.concatenate(mlp_rows, axis=0)[..., 0, :] if M else None  # one row: drop the n axis
        final = contract(d.final[None], S)[..., 0, :]
        if per_row:  # the batch axis first, as one DenseGates per prompt
            attn, mlp = jnp.moveaxis(attn, 1, 0), None if mlp is None else jnp.moveaxis(mlp, 1, 0)
        return DenseGates(attn=attn, mlp=mlp, logits=final)

    return logits, pull

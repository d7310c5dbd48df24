"""Plain numpy references the tests compare the JAX code against (float64, loops, no cleverness)."""

from __future__ import annotations

import numpy as np

from acdc_jax.graph import Graph
from acdc_jax.models import Transformer, model_arrays


def _params(model: Transformer) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in model_arrays(model).items()}


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _rms(x, w, eps, unit_offset=False):
    """RMSNorm; ``unit_offset``: Gemma's, with the scale ``1 + w``."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * ((1 + w) if unit_offset else w)


def _norm(cfg, p, prefix, x, layer=None):
    """The config's norm with the parameters ``prefix.w``/``prefix.b`` (of ``layer``, if stacked)."""
    if cfg.normalization is None:
        return x
    at = (lambda a: a) if layer is None else (lambda a: a[layer])  # noqa: E731
    if cfg.normalization == "ln":
        return _ln(x, at(p[prefix + ".w"]), at(p[prefix + ".b"]), cfg.ln_eps)
    return _rms(x, at(p[prefix + ".w"]), cfg.ln_eps, cfg.normalization == "gemma_rms")


def _rotary(cfg, x):
    """HF's rotate-half rotary embedding of ``[batch, pos, d_head]`` at positions 0..P-1."""
    dim = cfg.rotary_dim
    angles = np.arange(x.shape[1])[:, None] * np.asarray(cfg.rotary_inv_freq())[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    half = dim // 2
    a, b, rest = x[..., :half], x[..., half:dim], x[..., dim:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin, rest], axis=-1)


def _act(name, x):
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "gelu":
        from scipy.special import erf

        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu_new":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    raise NotImplementedError(name)


def _softcap(x, cap):
    return x if cap is None else np.tanh(x / cap) * cap


def _softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def gate_of(graph: Graph, gates: np.ndarray, src: str, dst: str):
    """The gate on edge src->dst: a scalar, or a [pos] vector for per-position gates."""
    if graph.level == "node":
        return gates[..., graph.index(src)]
    g = gates[..., graph.index(f"{src}->{dst}")]
    if graph.internal_edges and dst.startswith("a") and dst.count(".") == 2:
        head = dst.rsplit(".", 1)[0]
        g = g * gates[..., graph.index(f"{dst}->{head}")]
    return g


def gated_logits(model: Transformer, graph: Graph, tokens, gates, ablated_values, return_sources: bool = False):
    """in_d = sum_s g[d,s] x_s + (1 - g[d,s]) x~_s + (b_O of every earlier attention layer).

    With post norms (Gemma-2) head h of layer l is ``x_h = y_h (1 + w) / rms(sum_h' y_h')`` over the
    head outputs ``y`` of this run, and the MLP's output is normalised. With ``return_sources`` also
    every source's output in this run, in the graph's source order.
    """
    cfg = model.config
    p = _params(model)
    gates = np.asarray(gates, np.float64)
    abl = np.asarray(ablated_values, np.float64)
    tokens = np.asarray(tokens)
    B, P = tokens.shape
    x = {"embed": p["embed.W_E"][tokens] * cfg.embed_multiplier + (p["embed.W_pos"][:P][None] if "embed.W_pos" in p else 0.0)}
    abl_of = {name: np.broadcast_to(abl[i], (B, P, cfg.d_model)) for i, name in enumerate(graph.sources)}

    def dst_input(dst, n_bias_layers):
        total = np.zeros((B, P, cfg.d_model))
        if "blocks.attn.b_O" in p:  # none with post norms
            total = total + sum(p["blocks.attn.b_O"][l] for l in range(n_bias_layers))
        for src in graph.sources_of(dst):
            g = gate_of(graph, gates, src, dst)
            if np.ndim(g) == 1:  # per destination position
                g = g[None, :, None]
            total = total + g * x[src] + (1 - g) * abl_of[src]
        return total

    unit_offset = cfg.normalization == "gemma_rms"
    for l in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            head = f"a{l}.{h}"
            ins = {}
            for t in "qkv":
                ins[t] = _norm(cfg, p, "blocks.ln1", dst_input(graph.input_of(l, h, t), l), l)  # a group's k/v with kv_heads
            kv = h // cfg.kv_group  # the key/value head this query head reads
            q = ins["q"] @ p["blocks.attn.W_Q"][l, h] + p["blocks.attn.b_Q"][l, h]
            k = ins["k"] @ p["blocks.attn.W_K"][l, kv] + p["blocks.attn.b_K"][l, kv]
            v = ins["v"] @ p["blocks.attn.W_V"][l, kv] + p["blocks.attn.b_V"][l, kv]
            if cfg.qk_norm:
                q = _rms(q, p["blocks.attn.q_norm"][l], cfg.ln_eps, unit_offset)
                k = _rms(k, p["blocks.attn.k_norm"][l], cfg.ln_eps, unit_offset)
            if cfg.positional == "rotary":
                q, k = _rotary(cfg, q), _rotary(cfg, k)
            scores = _softcap(np.einsum("bqe,bke->bqk", q, k) / cfg.layer_attn_scale(l), cfg.attn_softcap)
            i, j = np.arange(P)[:, None], np.arange(P)[None, :]
            if cfg.causal:
                scores = np.where((j <= i)[None], scores, -np.inf)
            window = cfg.layer_windows[l]
            if window is not None:
                scores = np.where((i - j < window)[None], scores, -np.inf)
            x[head] = np.einsum("bqk,bke->bqe", _softmax(scores), v) @ p["blocks.attn.W_O"][l, h]
        if cfg.post_norms:  # each head's share of the normalised sum, the scale from this run's heads
            heads = [f"a{l}.{h}" for h in range(cfg.n_heads)]
            total = sum(x[head] for head in heads)
            w = p["blocks.ln1_post.w"][l]
            scale = ((1 + w) if unit_offset else w) / np.sqrt((total * total).mean(-1, keepdims=True) + cfg.ln_eps)
            for head in heads:
                x[head] = x[head] * scale
        if cfg.has_mlp:
            # a parallel MLP (GPT-NeoX) reads the residual before its own layer's heads and b_O
            m = _norm(cfg, p, "blocks.ln2", dst_input(f"mlp{l}", l if cfg.parallel else l + 1), l)
            hidden = m @ p["blocks.mlp.W_in"][l] + p["blocks.mlp.b_in"][l]
            if cfg.gated_mlp:
                hidden = _act(cfg.act_fn, m @ p["blocks.mlp.W_gate"][l] + p["blocks.mlp.b_gate"][l]) * hidden
            else:
                hidden = _act(cfg.act_fn, hidden)
            x[f"mlp{l}"] = hidden @ p["blocks.mlp.W_out"][l] + p["blocks.mlp.b_out"][l]
            if cfg.post_norms:
                x[f"mlp{l}"] = _norm(cfg, p, "blocks.ln2_post", x[f"mlp{l}"], l)
    final = _norm(cfg, p, "ln_final", dst_input("logits", cfg.n_layers))
    W_U = p["embed.W_E"].T if cfg.tied_unembed else p["unembed.W_U"]
    logits = _softcap(final @ W_U + p["unembed.b_U"], cfg.logit_softcap)
    if return_sources:
        return logits, np.stack([x[name] for name in graph.sources])
    return logits

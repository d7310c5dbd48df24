"""``attention_patterns``: probabilities that sum to one, causal zeros, and a plain float64 reference."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax.models import attention_patterns, init_model, model_arrays

from .conftest import TINY_CONFIGS
from .reference import _act, _ln, _softmax


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_model(request):
    """The conftest's tiny models, built once per module (each test here only reads them)."""
    return init_model(TINY_CONFIGS[request.param], jax.random.PRNGKey(0), std=0.3)


def _tokens(model, batch=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, model.config.d_vocab, (batch, model.config.n_ctx))


def _plain_patterns(model, tokens) -> np.ndarray:
    """The ungated forward in numpy float64, one head at a time, keeping each softmax."""
    cfg = model.config
    p = {k: np.asarray(v, np.float64) for k, v in model_arrays(model).items()}
    B, P = tokens.shape
    ln = cfg.normalization == "ln"
    x = p["embed.W_E"][tokens] + p["embed.W_pos"][:P][None]
    patterns = np.zeros((cfg.n_layers, B, cfg.n_heads, P, P))
    for l in range(cfg.n_layers):
        h_in = _ln(x, p["blocks.ln1.w"][l], p["blocks.ln1.b"][l], cfg.ln_eps) if ln else x
        attn_out = np.zeros_like(x) + p["blocks.attn.b_O"][l]
        for h in range(cfg.n_heads):
            q = h_in @ p["blocks.attn.W_Q"][l, h] + p["blocks.attn.b_Q"][l, h]
            k = h_in @ p["blocks.attn.W_K"][l, h] + p["blocks.attn.b_K"][l, h]
            v = h_in @ p["blocks.attn.W_V"][l, h] + p["blocks.attn.b_V"][l, h]
            scores = np.einsum("bqe,bke->bqk", q, k) / cfg.layer_attn_scale(l)
            if cfg.causal:
                scores = np.where(np.tril(np.ones((P, P), bool))[None], scores, -np.inf)
            patterns[l, :, h] = _softmax(scores)
            attn_out = attn_out + np.einsum("bqk,bke->bqe", patterns[l, :, h], v) @ p["blocks.attn.W_O"][l, h]
        x = x + attn_out
        if cfg.has_mlp:
            m = _ln(x, p["blocks.ln2.w"][l], p["blocks.ln2.b"][l], cfg.ln_eps) if ln else x
            x = x + _act(cfg.act_fn, m @ p["blocks.mlp.W_in"][l] + p["blocks.mlp.b_in"][l]) @ p["blocks.mlp.W_out"][l] + p["blocks.mlp.b_out"][l]
    return patterns


def test_patterns_match_plain_float64_softmax(tiny_model):
    tokens = _tokens(tiny_model)
    with jax.enable_x64(True):
        model = tiny_model.astype(jnp.float64)
        got = np.asarray(attention_patterns(model, tokens))
    cfg = tiny_model.config
    assert got.shape == (cfg.n_layers, 3, cfg.n_heads, cfg.n_ctx, cfg.n_ctx)
    np.testing.assert_allclose(got, _plain_patterns(tiny_model, tokens), atol=1e-12, rtol=0)


def test_patterns_are_distributions_with_causal_zeros(tiny_model):
    tokens = _tokens(tiny_model, seed=1)
    got = np.asarray(attention_patterns(tiny_model, tokens))
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5, rtol=0)
    assert np.all(got >= 0)
    n = tiny_model.config.n_ctx
    future = ~np.tril(np.ones((n, n), bool))
    if tiny_model.config.causal:
        assert np.all(got[..., future] == 0.0)
    # float32 against the float64 reference, at float32 precision
    np.testing.assert_allclose(got, _plain_patterns(tiny_model, tokens), atol=2e-6, rtol=0)


def test_patterns_follow_pos_ids(tiny_model):
    """Permuted position ids change the patterns as the plain forward with permuted W_pos does."""
    tokens = _tokens(tiny_model, seed=2)
    perm = np.random.RandomState(3).permutation(tiny_model.config.n_ctx)
    got = attention_patterns(tiny_model, tokens, pos_ids=perm)
    permuted = eqx.tree_at(lambda m: m.embed.W_pos, tiny_model, tiny_model.embed.W_pos[perm])
    np.testing.assert_allclose(got, attention_patterns(permuted, tokens), atol=1e-6, rtol=0)

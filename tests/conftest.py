"""Strict test configuration: explicit ranks everywhere, jaxtyping shape checks at runtime."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("acdc_jax", "beartype.beartype"):
    import acdc_jax  # noqa: E402,F401

import pytest  # noqa: E402

from acdc_jax.models import TransformerConfig, init_model  # noqa: E402

# Small configurations that exercise every architectural switch.
TINY_CONFIGS = {
    "gpt2-like": TransformerConfig(n_layers=2, n_heads=3, d_model=12, d_head=4, d_mlp=20, d_vocab=29, n_ctx=9),
    "attn-only": TransformerConfig(
        n_layers=2, n_heads=2, d_model=8, d_head=4, d_mlp=None, d_vocab=17, n_ctx=8, tied_unembed=False, d_vocab_out=11
    ),
    "tracr-like": TransformerConfig(
        n_layers=3, n_heads=2, d_model=10, d_head=3, d_mlp=7, d_vocab=13, n_ctx=6, act_fn="relu",
        normalization=None, causal=False, tied_unembed=False,
    ),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return init_model(TINY_CONFIGS[request.param], jax.random.PRNGKey(0), std=0.3)

"""Config validation: bad values fail with a message that says what to change."""

import json

import pytest

from acdc_jax.models import ConfigError, TransformerConfig


def test_gpt2_presets():
    assert TransformerConfig.gpt2("gpt2-xl").n_heads == 25
    assert TransformerConfig.gpt2().attn_scale == 8.0
    with pytest.raises(ConfigError, match="unknown GPT-2 size 'gpt3'"):
        TransformerConfig.gpt2("gpt3")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_layers=0), "n_layers must be a positive int"),
        (dict(d_mlp=-3), "d_mlp must be a positive int or None"),
        (dict(act_fn="swiglu"), "unknown act_fn 'swiglu'"),
        (dict(normalization="batchnorm"), "normalization must be 'ln', 'rms', 'gemma_rms' or None"),
        (dict(post_norms=True), "post_norms needs an RMS norm"),
        (dict(sliding_window=(3,)), "one entry per layer \\(2\\), got 1"),
        (dict(sliding_window=(3, 0)), "sliding_window must be a positive int"),
        (dict(attn_softcap=-1.0), "attn_softcap must be a positive number or None"),
        (dict(n_kv_heads=3), "n_kv_heads must be a positive divisor of n_heads=2, got 3"),
        (dict(positional="alibi"), "positional must be 'learned', 'rotary' or 'none'"),
        (dict(d_vocab_out=7), "tied_unembed needs d_vocab_out == d_vocab"),
    ],
)
def test_bad_configs(change, message):
    kwargs = dict(n_layers=2, n_heads=2, d_model=8, d_head=4, d_vocab=11, n_ctx=5) | change
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**kwargs)


def test_round_trip_through_dict():
    cfg = TransformerConfig.gpt2("distilgpt2")
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown TransformerConfig fields"):
        TransformerConfig.from_dict(cfg.to_dict() | {"rotary": True})
    # per-layer windows and the Gemma-2 options survive JSON (which turns tuples into lists)
    gemma_like = TransformerConfig(n_layers=3, n_heads=2, d_model=8, d_head=4, d_mlp=12, d_vocab=11, n_ctx=5,
                                   normalization="gemma_rms", post_norms=True, positional="rotary", gated_mlp=True,
                                   sliding_window=(3, None, 3), attn_softcap=50.0, logit_softcap=30.0,
                                   embed_multiplier=8 ** 0.5)
    assert TransformerConfig.from_dict(json.loads(json.dumps(gemma_like.to_dict()))) == gemma_like
    assert gemma_like.layer_windows == (3, None, 3) and cfg.layer_windows == (None,) * cfg.n_layers

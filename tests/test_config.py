"""Config validation: bad values fail with a message that says what to change."""

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
        (dict(normalization="batchnorm"), "normalization must be 'ln', 'rms' or None"),
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

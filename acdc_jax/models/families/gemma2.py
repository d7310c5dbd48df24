"""Gemma-2.

Llama's layout with four norms per layer, all Gemma's ``(1 + w)`` RMSNorm: ``input_layernorm``
(ours ``ln1``) before attention, ``post_attention_layernorm`` (``ln1_post``) on the attention
output before it joins the residual, ``pre_feedforward_layernorm`` (``ln2``) before the MLP,
``post_feedforward_layernorm`` (``ln2_post``) on the MLP output. Note the name clash with Llama,
whose ``post_attention_layernorm`` is the norm before the MLP. Also: the token embedding times
``sqrt(hidden_size)``, scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped
(``attn_logit_softcapping``), logits soft-capped (``final_logit_softcapping``), sliding-window
attention in the layers ``layer_types`` marks (older files: the even layers), the GeGLU MLP
``down(gelu_tanh(gate(x)) * up(x))`` and a tied unembedding. The weight names are Llama's, so the
projections use its key map.
"""

from __future__ import annotations

import math


from .._config import TransformerConfig
from ._reader import LayerStack, StateReader, Tensor, build_config, decoder_fields, layer_windows, rope_settings, unembedding
from .llama import add_attention, add_gated_mlp

MODEL_TYPES = ("gemma2",)
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_new", "gelu_new": "gelu_new", "gelu": "gelu"}


def config_from_hf(hf: dict, name: str = "") -> TransformerConfig:
    from .._loading import LoadError

    if hf.get("attention_bias"):
        raise LoadError(
            "Gemma-2 with attention_bias=true is not supported: o_proj's bias would sit inside the "
            "post-attention norm, where it is not a constant of the graph"
        )
    if hf.get("use_bidirectional_attention"):
        raise LoadError("Gemma-2 with use_bidirectional_attention=true is not supported (only causal attention)")
    # configs carry hidden_activation; some older ones also an unused hidden_act
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise LoadError(f"Gemma-2: hidden_activation {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    d_model, n_heads, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    d_head = hf.get("head_dim") or d_model // n_heads
    return build_config(
        "Gemma-2",
        **decoder_fields(hf, d_head, 8192),
        act_fn=_ACTIVATIONS[act],
        normalization="gemma_rms",
        post_norms=True,
        attn_scale=math.sqrt(hf.get("query_pre_attn_scalar", 256)),
        attn_softcap=hf.get("attn_logit_softcapping"),
        logit_softcap=hf.get("final_logit_softcapping"),
        embed_multiplier=math.sqrt(d_model),
        tied_unembed=bool(hf.get("tie_word_embeddings", True)),
        **rope_settings(hf, d_head, "Gemma-2"),
        sliding_window=layer_windows(hf, n_layers, hf.get("sliding_window"), lambda layer: layer % 2 == 0, "Gemma-2"),
        name=name,
    )


def state_dict_to_ours(config: TransformerConfig, state: dict[str, Tensor], where: str = "") -> dict[str, Tensor]:
    take = StateReader(state, "Gemma-2", where, ignore=r"rotary_emb\.inv_freq$")
    L, D = config.n_layers, config.d_model
    layers = LayerStack()
    add = layers.add
    for l in range(L):
        p = f"model.layers.{l}."
        add("blocks.ln1.w", take(p + "input_layernorm.weight", (D,)))
        add_attention(take, add, p + "self_attn.", config)
        add("blocks.ln1_post.w", take(p + "post_attention_layernorm.weight", (D,)))
        add("blocks.ln2.w", take(p + "pre_feedforward_layernorm.weight", (D,)))
        add_gated_mlp(take, add, p + "mlp.", config)
        add("blocks.ln2_post.w", take(p + "post_feedforward_layernorm.weight", (D,)))
    out = {"embed.W_E": take("model.embed_tokens.weight", (config.d_vocab, D))}
    out |= layers.stacked()
    out["ln_final.w"] = take("model.norm.weight", (D,))
    out |= unembedding(take, config, "lm_head.weight")
    take.finish()
    return out

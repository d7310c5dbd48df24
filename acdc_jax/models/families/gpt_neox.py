"""GPT-NeoX and Pythia.

LayerNorm with biases, partial rotary (the first ``rotary_pct`` of each head's dimensions rotate),
untied unembedding ``embed_out``, and, with ``use_parallel_residual`` (every Pythia model),
attention and MLP reading the same residual: ``x + attn(ln1(x)) + mlp(ln2(x))``, so the MLP has no
edges from its own layer's heads.

``query_key_value.weight`` (``[3 * d_model, d_model]``) holds, for each head in turn, its q, k and
v rows (HF views the output as ``[..., n_heads, 3 * d_head]`` and splits the last axis in three):
rows ``h*3E + [0, E)`` are head h's query, ``+ [E, 2E)`` its key, ``+ [2E, 3E)`` its value.
"""

from __future__ import annotations


from .._config import TransformerConfig
from ._reader import LayerStack, StateReader, Tensor, build_config, rope_settings, unembedding

MODEL_TYPES = ("gpt_neox",)
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def config_from_hf(hf: dict, name: str = "") -> TransformerConfig:
    from .._loading import LoadError

    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise LoadError(f"GPT-NeoX: hidden_act {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if d_model % n_heads:
        raise LoadError(f"GPT-NeoX: hidden_size={d_model} is not divisible by num_attention_heads={n_heads}")
    d_head = d_model // n_heads
    return build_config(
        "GPT-NeoX",
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        d_mlp=hf.get("intermediate_size") or 4 * d_model,
        d_vocab=hf["vocab_size"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        act_fn=_ACTIVATIONS[act],
        normalization="ln",
        ln_eps=float(hf.get("layer_norm_eps", 1e-5)),
        causal=True,
        tied_unembed=bool(hf.get("tie_word_embeddings", False)),
        positional="rotary",
        **rope_settings(hf, d_head, "GPT-NeoX"),
        parallel=bool(hf.get("use_parallel_residual", True)),
        name=name,
    )


def state_dict_to_ours(config: TransformerConfig, state: dict[str, Tensor], where: str = "") -> dict[str, Tensor]:
    take = StateReader(state, "GPT-NeoX", where, ignore=r"attention\.(bias|masked_bias)$|rotary_emb\.inv_freq$")
    L, H, D, E, M = config.n_layers, config.n_heads, config.d_model, config.d_head, config.d_mlp
    layers = LayerStack()
    add = layers.add
    for l in range(L):
        p = f"gpt_neox.layers.{l}."
        add("blocks.ln1.w", take(p + "input_layernorm.weight", (D,)))
        add("blocks.ln1.b", take(p + "input_layernorm.bias", (D,)))
        w = take(p + "attention.query_key_value.weight", (3 * D, D)).reshape(H, 3, E, D)
        b = take.optional(p + "attention.query_key_value.bias", (3 * D,)).reshape(H, 3, E)
        for i, name in enumerate("QKV"):
            add(f"blocks.attn.W_{name}", w[:, i].transpose(0, 2, 1))
            add(f"blocks.attn.b_{name}", b[:, i])
        add("blocks.attn.W_O", take(p + "attention.dense.weight", (D, D)).T.reshape(H, E, D))
        add("blocks.attn.b_O", take.optional(p + "attention.dense.bias", (D,)))
        add("blocks.ln2.w", take(p + "post_attention_layernorm.weight", (D,)))
        add("blocks.ln2.b", take(p + "post_attention_layernorm.bias", (D,)))
        add("blocks.mlp.W_in", take(p + "mlp.dense_h_to_4h.weight", (M, D)).T)
        add("blocks.mlp.b_in", take(p + "mlp.dense_h_to_4h.bias", (M,)))
        add("blocks.mlp.W_out", take(p + "mlp.dense_4h_to_h.weight", (D, M)).T)
        add("blocks.mlp.b_out", take(p + "mlp.dense_4h_to_h.bias", (D,)))
    out = {"embed.W_E": take("gpt_neox.embed_in.weight", (config.d_vocab, D))}
    out |= layers.stacked()
    out["ln_final.w"] = take("gpt_neox.final_layer_norm.weight", (D,))
    out["ln_final.b"] = take("gpt_neox.final_layer_norm.bias", (D,))
    # checkpoints name the unembedding embed_out; transformers >= 5 calls the module lm_head
    head = "embed_out.weight" if "embed_out.weight" in take or "lm_head.weight" not in take else "lm_head.weight"
    out |= unembedding(take, config, head)
    take.finish()
    return out

"""Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/Qwen2.5 and Qwen3: one key map, since their checkpoints
name every tensor alike.

RMSNorm before attention and MLP, rotary q/k (with Llama 3's ``rope_scaling``), grouped-query
attention, the gated SiLU MLP ``down(silu(gate(x)) * up(x))``, tied or untied unembedding. What
differs is data: Qwen2 has q/k/v biases, Llama optional ones (``attention_bias``, ``mlp_bias``),
Qwen3 an RMSNorm over each head's q and k (``q_norm``, ``k_norm``), Mistral a sliding window in every
layer, Qwen2/Qwen3 with ``use_sliding_window`` one in the layers ``>= max_window_layers`` (or as
``layer_types`` says).

HF's ``nn.Linear`` stores ``[out, in]`` and computes ``x @ W.T``; ``q_proj.weight`` rows are the
heads one after another, so ``W_Q[h] = q_proj.weight[h*E:(h+1)*E].T``, and ``o_proj.weight``
columns are the merged heads, so ``W_O[h] = o_proj.weight[:, h*E:(h+1)*E].T``.
"""

from __future__ import annotations


from .._config import TransformerConfig
from ._reader import LayerStack, StateReader, Tensor, build_config, decoder_fields, layer_windows, rope_settings, unembedding

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_new", "gelu_new": "gelu_new"}


def config_from_hf(hf: dict, name: str = "") -> TransformerConfig:
    from .._loading import LoadError

    model_type = hf["model_type"]
    family = _NAMES[model_type]
    n_layers = hf["num_hidden_layers"]
    if model_type == "mistral":  # every layer, whatever layer_types says (as MistralAttention reads it)
        sliding_window = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", 28)  # transformers' default
        sliding_window = layer_windows(hf, n_layers, hf.get("sliding_window"), lambda layer: layer >= first, family)
    else:
        sliding_window = None
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise LoadError(f"{family}: hidden_act {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or d_model // n_heads
    return build_config(
        family,
        **decoder_fields(hf, d_head, 2048),
        act_fn=_ACTIVATIONS[act],
        normalization="rms",
        tied_unembed=bool(hf.get("tie_word_embeddings", False)),
        **rope_settings(hf, d_head, family),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        name=name,
    )


def add_attention(take: StateReader, add, prefix: str, config: TransformerConfig) -> None:
    """One layer's ``{q,k,v,o}_proj`` (and ``q_norm``/``k_norm``) under ``prefix`` (``...self_attn.``);
    no ``b_O`` in a model with post norms (Gemma-2), whose ``o_proj`` has no bias."""
    H, KV, D, E = config.n_heads, config.kv_heads, config.d_model, config.d_head
    for w, n in (("Q", H), ("K", KV), ("V", KV)):
        proj = f"{prefix}{w.lower()}_proj."
        add(f"blocks.attn.W_{w}", take(proj + "weight", (n * E, D)).reshape(n, E, D).transpose(0, 2, 1))
        add(f"blocks.attn.b_{w}", take.optional(proj + "bias", (n * E,)).reshape(n, E))
    add("blocks.attn.W_O", take(prefix + "o_proj.weight", (D, H * E)).T.reshape(H, E, D))
    if not config.post_norms:
        add("blocks.attn.b_O", take.optional(prefix + "o_proj.bias", (D,)))
    if config.qk_norm:
        add("blocks.attn.q_norm", take(prefix + "q_norm.weight", (E,)))
        add("blocks.attn.k_norm", take(prefix + "k_norm.weight", (E,)))


def add_gated_mlp(take: StateReader, add, prefix: str, config: TransformerConfig) -> None:
    """One layer's ``down(act(gate(x)) * up(x))`` under ``prefix`` (``...mlp.``); missing biases are zeros."""
    D, M = config.d_model, config.d_mlp
    add("blocks.mlp.W_gate", take(prefix + "gate_proj.weight", (M, D)).T)
    add("blocks.mlp.b_gate", take.optional(prefix + "gate_proj.bias", (M,)))
    add("blocks.mlp.W_in", take(prefix + "up_proj.weight", (M, D)).T)
    add("blocks.mlp.b_in", take.optional(prefix + "up_proj.bias", (M,)))
    add("blocks.mlp.W_out", take(prefix + "down_proj.weight", (D, M)).T)
    add("blocks.mlp.b_out", take.optional(prefix + "down_proj.bias", (D,)))


def state_dict_to_ours(config: TransformerConfig, state: dict[str, Tensor], where: str = "") -> dict[str, Tensor]:
    take = StateReader(state, "Llama-family", where, ignore=r"rotary_emb\.inv_freq$")
    L, D = config.n_layers, config.d_model
    layers = LayerStack()
    add = layers.add
    for l in range(L):
        p = f"model.layers.{l}."
        add("blocks.ln1.w", take(p + "input_layernorm.weight", (D,)))
        add_attention(take, add, p + "self_attn.", config)
        add("blocks.ln2.w", take(p + "post_attention_layernorm.weight", (D,)))
        add_gated_mlp(take, add, p + "mlp.", config)
    out = {"embed.W_E": take("model.embed_tokens.weight", (config.d_vocab, D))}
    out |= layers.stacked()
    out["ln_final.w"] = take("model.norm.weight", (D,))
    out |= unembedding(take, config, "lm_head.weight")
    take.finish()
    return out

"""One small module per Hugging Face family: its ``config.json`` to a ``TransformerConfig`` and its
state-dict names to ours (``acdc_jax.models._loading`` has GPT-2's). Each module exports
``MODEL_TYPES``, ``config_from_hf(hf, name)`` and ``state_dict_to_ours(config, state, where)``."""

from . import gemma2, gpt_neox, llama

FAMILIES = {model_type: module for module in (llama, gpt_neox, gemma2) for model_type in module.MODEL_TYPES}

__all__ = ["FAMILIES"]

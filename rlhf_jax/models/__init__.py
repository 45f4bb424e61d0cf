"""Decoder families (GPT-2, Llama 2/3, Qwen2, Qwen3) and Hugging Face checkpoint I/O."""

from rlhf_jax.models.config import (
    ConfigError, DecoderConfig, check_exportable, from_hf_config, to_hf_config)
from rlhf_jax.models.hf import (
    CheckpointError, from_pretrained, inspect_checkpoint, save_pretrained)
from rlhf_jax.models.transformer import (
    CausalLM, KVCache, ScalarModel, init_cache, positions_from_mask)

__all__ = [
    "CausalLM", "CheckpointError", "ConfigError", "DecoderConfig", "KVCache", "ScalarModel",
    "check_exportable", "from_hf_config", "from_pretrained", "init_cache", "inspect_checkpoint",
    "positions_from_mask", "save_pretrained", "to_hf_config",
]

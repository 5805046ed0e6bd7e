"""Pure model functions. The Llama family is the one implemented: `init(config, key)` and
`forward(params, tokens, config, ...)`; see `pure/models/llama.py`."""
from pure.models.config import ModelConfig, config_from_hf, config_to_hf
from pure.models.llama import (KVCache, ModelOutput, empty_cache, forward, init, lm_head_weight, preallocated_cache,
                               resize_embeddings)

__all__ = [
    "KVCache", "ModelConfig", "ModelOutput", "config_from_hf", "config_to_hf", "empty_cache", "forward", "init",
    "lm_head_weight", "preallocated_cache", "resize_embeddings",
]

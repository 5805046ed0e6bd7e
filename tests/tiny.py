"""The tiny random Llama-family shape the unit tests share: 2 layers, GQA (4 query heads over 2
key/value heads), a 61-token vocabulary. Small enough for float64 oracles, big enough to have every
part of the forward (GQA, SwiGLU, rope, tied embeddings)."""
from pure.models.config import ModelConfig

TINY = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


def vllm_tiny(tokenizer) -> ModelConfig:
    """The tiny model the real-vLLM tests serve: the real tokenizer's vocabulary, head size 64 (vLLM's
    CPU attention kernels take the usual head sizes only), GQA, tied embeddings."""
    return ModelConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

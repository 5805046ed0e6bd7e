"""The tiny random Llama-family shape the unit tests share: 2 layers, GQA (4 query heads over 2
key/value heads), a 61-token vocabulary. Small enough for float64 oracles, big enough to have every
part of the forward (GQA, SwiGLU, rope, tied embeddings)."""
from pure.models.config import ModelConfig

TINY = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)

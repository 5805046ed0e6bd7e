"""Fixtures the program tests share: a tiny random SmolLM2-family model saved as an HF folder,
with the real SmolLM2 tokenizer (so chat templates and special tokens are the real ones)."""
import pytest

from backends.hf import load_tokenizer, save_pretrained
from pure import rng
from pure.models import ModelConfig, init


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(init(config, rng.key(0)), config, tokenizer, path)
    return path

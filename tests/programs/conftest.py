"""Fixtures the program tests share: a tiny random SmolLM2-family model saved as an HF folder,
with the real SmolLM2 tokenizer (so chat templates and special tokens are the real ones)."""
import pytest

from backends.hf import load_tokenizer, save_pretrained
from pure import rng
from pure.models import ModelConfig, init


def _tiny_folder(tmp_path_factory, hidden: int):
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(init(config, rng.key(0)), config, tokenizer, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return _tiny_folder(tmp_path_factory, 32)


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory):
    """The same family with linears of >= 64 inputs, so every row holds a whole 4-bit block, as
    bitsandbytes' CPU path needs (the QLoRA tests and examples)."""
    return _tiny_folder(tmp_path_factory, 64)

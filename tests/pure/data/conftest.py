"""Shared fixtures for the data tests: the real SmolLM2 tokenizer (loaded once per session)."""
import pytest


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from backends.hf import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")

"""Growing the vocabulary: new embedding rows are the mean of the old ones, old rows are untouched."""
import pytest
import torch

from pure import rng
from pure.models import ModelConfig, forward, init, resize_embeddings


def config(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_mean_of_the_old_rows(tied):
    params = init(config(tied), rng.key(0))
    grown, grown_config = resize_embeddings(params, config(tied), 43)
    assert grown_config.vocab_size == 43 and params["model.embed_tokens.weight"].shape[0] == 40  # input kept
    for name in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        old, new = params[name], grown[name]
        assert new.shape == (43, 16) and torch.equal(new[:40], old)
        torch.testing.assert_close(new[40:], old.mean(0).expand(3, -1))
    assert ("lm_head.weight" in grown) == (not tied)


def test_a_new_token_logit_is_the_mean_of_the_old_logits_with_tied_embeddings():
    params, grown_config = resize_embeddings(init(config(True), rng.key(1)), config(True), 42)
    logits = forward(params, rng.randint(rng.key(2), 0, 40, (2, 5)), grown_config).logits
    # fp32: a mean of 40 logits against the logit of the mean row, op order only
    torch.testing.assert_close(logits[..., 40], logits[..., :40].mean(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_with_a_key_new_rows_are_drawn_with_the_init_scale(tied):
    params = init(config(tied), rng.key(0))
    grown, _ = resize_embeddings(params, config(tied), 840, key=rng.key(5))
    again, _ = resize_embeddings(params, config(tied), 840, key=rng.key(5))
    for name in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        new = grown[name][40:]
        assert torch.equal(grown[name][:40], params[name]) and torch.equal(new, again[name][40:])
        # 800 x 16 draws of N(0, 0.02^2): the sample std is within 5% of 0.02 and the mean near 0
        assert abs(new.std().item() - 0.02) < 0.001 and abs(new.mean().item()) < 0.001

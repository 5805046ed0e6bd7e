"""Reward-model losses: Bradley-Terry and PRM against hand computations, gradients, composition,
micro-batching, and the score heads against transformers' classification models."""
import math

import pytest
import torch

from pure import rng
from pure.data.reward_batch import collate_reward_pairs, collate_token_labels
from pure.losses.reward import (
    center_rewards,
    make_bradley_terry,
    make_prm,
)
from pure.models.config import config_to_hf
from pure.models.heads import init_score_head, last_non_pad_index, sequence_scores, token_scores
from pure.models.llama import ModelOutput, init
from pure.optim import sgd
from pure.train import Policy, init_train_state, make_apply, make_train_step
from tests.tiny import TINY

CONFIG = TINY
PAD = 0
EXACT = 1e-10  # float64 against hand-computed float64 formulas
FP32 = 1e-5  # float32 forwards of the same weights (ours vs transformers, accumulation orders)


def fixed_apply(hidden, head):
    """A `Policy` that returns given hidden states: the losses' math without a model."""

    def apply(tokens, key=None, **kwargs):
        assert kwargs.get("compute_logits") is False  # reward losses never run lm_head
        return ModelOutput(None, hidden, {}, None)

    def no_lm_head(hidden, targets):
        raise AssertionError("reward losses never run lm_head")

    return Policy(apply, no_lm_head, head)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- Bradley-Terry


def pair_setup(seed=0, B=3, T=5, E=4):
    keys = rng.split(rng.key(seed), 4)
    hidden = rng.normal(keys[0], (2 * B, T, E), dtype=torch.float64)
    weight = rng.normal(keys[1], (1, E), dtype=torch.float64)
    last = rng.randint(keys[2], 0, T, (2 * B,))
    margin = rng.uniform(keys[3], (B,), dtype=torch.float64)
    return hidden, weight, last, margin


@pytest.mark.parametrize("center", [None, 0.01, 0.3])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_equals_hand_computed_float64(center, with_margin):
    B = 3
    hidden, weight, last, margin = pair_setup(B=B)
    batch = {"input_ids": torch.zeros(2 * B, 5, dtype=torch.long), "last_index": last, "total_pairs": torch.tensor(5)}
    if with_margin:
        batch["margin"] = margin
    loss, metrics = make_bradley_terry(center)(fixed_apply(hidden, {"score.weight": weight}), batch)

    r = [sum(hidden[i, int(last[i]), e].item() * weight[0, e].item() for e in range(4)) for i in range(2 * B)]
    chosen, rejected = r[:B], r[B:]
    m = margin.tolist() if with_margin else [0.0] * B
    want = sum(-math.log(sigmoid(c - j - mi)) for c, j, mi in zip(chosen, rejected, m)) / 5
    if center:
        want += center * sum((c + j) ** 2 for c, j in zip(chosen, rejected)) / 5
    assert loss.dtype == torch.float64 and abs(loss.item() - want) <= EXACT
    assert abs(metrics["rewards/chosen"].item() - sum(chosen) / 5) <= EXACT
    assert abs(metrics["rewards/rejected"].item() - sum(rejected) / 5) <= EXACT
    assert abs(metrics["margin"].item() - (sum(chosen) - sum(rejected)) / 5) <= EXACT
    assert abs(metrics["mean_reward"].item() - sum(r) / 10) <= EXACT
    assert metrics["accuracy"].item() == pytest.approx(sum(c > j for c, j in zip(chosen, rejected)) / 5, abs=EXACT)
    assert torch.equal(metrics["accuracy"], metrics["rewards/accuracies"])


def test_bradley_terry_gradients_match_finite_differences():
    hidden, weight, last, margin = pair_setup(seed=1, B=2)
    loss = make_bradley_terry(0.05)

    def f(h, w, m):
        batch = {"input_ids": torch.zeros(4, 5, dtype=torch.long), "last_index": last, "margin": m,
                 "total_pairs": torch.tensor(3)}
        return loss(fixed_apply(h, {"score.weight": w}), batch)[0]

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_(), margin.requires_grad_()))


def test_bradley_terry_plus_center_term_is_the_centred_loss():
    params = init(CONFIG, rng.key(0))
    head = init_score_head(CONFIG, 1, rng.key(1))
    apply = make_apply(CONFIG, params)({"params": head})
    examples = [{"chosen_input_ids": [3, 4, 5, 6], "rejected_input_ids": [3, 4, 9]},
                {"chosen_input_ids": [7, 8], "rejected_input_ids": [7, 8, 10, 11, 12]}]
    batch = {**collate_reward_pairs(examples, [0, 1], 2, PAD)[0], "total_pairs": torch.tensor(2)}
    composed = make_bradley_terry() + 0.25 * center_rewards
    value, metrics = composed.on_batch(apply, batch)
    direct, _ = make_bradley_terry(0.25).on_batch(apply, batch)
    assert abs(value.item() - direct.item()) <= FP32
    plain, _ = make_bradley_terry().on_batch(apply, batch)
    assert abs(metrics["loss/bradley_terry"].item() - plain.item()) <= FP32
    assert metrics["loss/0.25*center_rewards"].item() > 0


def test_bradley_terry_refuses_a_two_label_head_and_a_missing_head():
    hidden, _, last, _ = pair_setup()
    batch = {"input_ids": torch.zeros(6, 5, dtype=torch.long), "last_index": last}
    with pytest.raises(ValueError, match="num_labels 1"):
        make_bradley_terry()(fixed_apply(hidden, {"score.weight": torch.zeros(2, 4, dtype=torch.float64)}), batch)
    with pytest.raises(KeyError, match="score.weight"):
        make_bradley_terry()(fixed_apply(hidden, {}), batch)


# ----------------------------------------------------------------------------- PRM


def prm_setup(seed=0, B=2, T=6, E=4, L=2):
    keys = rng.split(rng.key(seed), 4)
    hidden = rng.normal(keys[0], (B, T, E), dtype=torch.float64)
    weight = rng.normal(keys[1], (L, E), dtype=torch.float64)
    bias = rng.normal(keys[2], (L,), dtype=torch.float64)
    labels = torch.full((B, T), -100)
    labels[0, 2], labels[0, 5], labels[1, 1], labels[1, 3], labels[1, 4] = 1, 0, 0, 1, 1
    return hidden, weight, bias, labels


def test_prm_equals_hand_computed_float64():
    hidden, weight, bias, labels = prm_setup()
    batch = {"input_ids": torch.zeros_like(labels), "labels": labels, "total_labelled_tokens": torch.tensor(7)}
    loss, metrics = make_prm()(fixed_apply(hidden, {"score.weight": weight, "score.bias": bias}), batch)
    want, correct = 0.0, 0
    for b, t in labels.ne(-100).nonzero().tolist():
        z = [sum(hidden[b, t, e].item() * weight[k, e].item() for e in range(4)) + bias[k].item() for k in range(2)]
        log_norm = math.log(sum(math.exp(v) for v in z))
        y = int(labels[b, t])
        want -= z[y] - log_norm
        correct += int(max(range(2), key=lambda k: z[k]) == y)
    assert loss.dtype == torch.float64 and abs(loss.item() - want / 7) <= EXACT
    assert abs(metrics["accuracy"].item() - correct / 7) <= EXACT
    assert metrics["num_labelled_tokens"].item() == 5


def test_prm_gradients_match_finite_differences():
    hidden, weight, bias, labels = prm_setup(seed=2, L=3)
    labels[1, 4] = 2
    batch = {"input_ids": torch.zeros_like(labels), "labels": labels}

    def f(h, w, b):
        return make_prm(num_labels=3).on_batch(fixed_apply(h, {"score.weight": w, "score.bias": b}), batch)[0]

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))


def test_prm_head_dropout_only_with_a_key():
    hidden, weight, bias, labels = prm_setup()
    apply = fixed_apply(hidden, {"score.weight": weight, "score.bias": bias})
    batch = {"input_ids": torch.zeros_like(labels), "labels": labels}
    plain = make_prm().on_batch(apply, batch)[0]
    dropped = make_prm(classifier_dropout=0.5)
    assert torch.equal(dropped.on_batch(apply, batch)[0], plain)  # no key: evaluation, no dropout
    a, b = dropped.on_batch(apply, batch, rng.key(3))[0], dropped.on_batch(apply, batch, rng.key(3))[0]
    assert torch.equal(a, b) and not torch.equal(a, plain)
    with pytest.raises(ValueError, match="num_labels=3"):
        make_prm(num_labels=3).on_batch(apply, batch)


# ----------------------------------------------------------------------------- the train step


def one_step(loss, micro_batches, head_kind, num_labels):
    params = init(CONFIG, rng.key(0))
    head = init_score_head(CONFIG, num_labels, rng.key(1), kind=head_kind)
    optimizer = sgd(0.1)
    step = make_train_step(loss, optimizer, make_apply(CONFIG, {}))
    state = init_train_state({"params": {**params, **head}}, optimizer, rng.key(2))
    return step(state, micro_batches)


def assert_same_step(a, b, names):
    (sa, ma), (sb, mb) = a, b
    assert ma["train/grad_norm"].item() > 0
    head = init_score_head(CONFIG, sa.trainable["params"]["score.weight"].shape[0], rng.key(1))
    assert not torch.equal(sa.trainable["params"]["score.weight"], head["score.weight"])  # the head trains
    for name in names:
        assert abs(ma[name].item() - mb[name].item()) <= FP32, name
    for name, value in sa.trainable["params"].items():
        torch.testing.assert_close(value, sb.trainable["params"][name], atol=FP32, rtol=0)


def test_bradley_terry_step_is_the_same_for_any_micro_batching():
    lengths = [(4, 6), (7, 3), (5, 5), (2, 8)]
    examples = [{"chosen_input_ids": list(range(1, c + 1)), "rejected_input_ids": list(range(10, 10 + r))}
                for c, r in lengths]
    loss = make_bradley_terry(0.01)
    whole = one_step(loss, collate_reward_pairs(examples, [2, 0, 3, 1], 4, PAD), "sequence", 1)
    split = one_step(loss, collate_reward_pairs(examples, [2, 0, 3, 1], 3, PAD), "sequence", 1)
    assert_same_step(whole, split, ["train/loss", "accuracy", "rewards/margins", "mean_reward"])
    assert whole[1]["num_tokens"].item() == sum(c + r for c, r in lengths)
    assert whole[1]["train/loss"].item() > 0


def test_prm_step_is_the_same_for_any_micro_batching():
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 1, -100, 0]},
                {"input_ids": [11, 12, 13], "labels": [-100, -100, 1]},
                {"input_ids": [14, 15, 16, 17, 18, 19, 20], "labels": [-100, 0, -100, 1, -100, -100, 1]}]
    loss = make_prm()
    whole = one_step(loss, collate_token_labels(examples, [0, 1, 2], 3, PAD), "token", 2)
    split = one_step(loss, collate_token_labels(examples, [0, 1, 2], 1, PAD), "token", 2)
    assert_same_step(whole, split, ["train/loss", "accuracy", "num_labelled_tokens"])
    assert whole[1]["num_labelled_tokens"].item() == 6
    # an untrained 2-way head starts near chance: CE close to log 2
    assert abs(whole[1]["train/loss"].item() - math.log(2)) < 0.05


# ----------------------------------------------------------------------------- transformers parity


def hf_model(kind, num_labels, params, head):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(**{**config_to_hf(CONFIG), "num_labels": num_labels, "pad_token_id": PAD})
    cls = {"sequence": transformers.LlamaForSequenceClassification,
           "token": transformers.LlamaForTokenClassification}[kind]
    model = cls(hf_config).eval()
    state = {k: v for k, v in params.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict({**state, **head}, strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    return model


def test_sequence_scores_equal_llama_for_sequence_classification():
    params = init(CONFIG, rng.key(0))
    head = init_score_head(CONFIG, 1, rng.key(1))
    examples = [{"chosen_input_ids": [3, 4, 5, 6, 7], "rejected_input_ids": [3, 4]},
                {"chosen_input_ids": [8, 9, 10], "rejected_input_ids": [8, 9, 11, 12, 13, 14]}]
    batch = collate_reward_pairs(examples, [0, 1], 2, PAD)[0]
    hidden = make_apply(CONFIG, params)({})(batch["input_ids"], compute_logits=False).hidden
    ours = sequence_scores(hidden, batch["last_index"], head["score.weight"])
    with torch.no_grad():
        theirs = hf_model("sequence", 1, params, head)(batch["input_ids"]).logits
    assert ours.shape == theirs.shape == (4, 1)
    torch.testing.assert_close(ours, theirs, atol=FP32, rtol=0)


def test_token_scores_equal_llama_for_token_classification():
    params = init(CONFIG, rng.key(0))
    head = init_score_head(CONFIG, 2, rng.key(1), kind="token")
    head["score.bias"] = torch.tensor([0.3, -0.2])
    ids = rng.randint(rng.key(4), 1, CONFIG.vocab_size, (2, 7))
    hidden = make_apply(CONFIG, params)({})(ids, compute_logits=False).hidden
    ours = token_scores(hidden, head["score.weight"], head["score.bias"])
    with torch.no_grad():
        theirs = hf_model("token", 2, params, head)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=FP32, rtol=0)


def test_last_non_pad_index_is_transformers_rule():
    ids = torch.tensor([[5, 6, 0, 0], [0, 0, 7, 8], [5, 0, 6, 0], [0, 0, 0, 0]])
    assert last_non_pad_index(ids, 0).tolist() == [1, 3, 2, 0]
    assert last_non_pad_index(ids, None).tolist() == [3, 3, 3, 3]


def test_init_score_head_is_a_function_of_the_key():
    a = init_score_head(CONFIG, 2, rng.key(7), kind="token")
    b = init_score_head(CONFIG, 2, rng.key(7), kind="token")
    assert a["score.weight"].shape == (2, 32) and torch.equal(a["score.weight"], b["score.weight"])
    assert torch.equal(a["score.bias"], torch.zeros(2))
    assert set(init_score_head(CONFIG, 1, rng.key(7))) == {"score.weight"}
    with pytest.raises(ValueError, match="kind"):
        init_score_head(CONFIG, 1, rng.key(7), kind="tokens")

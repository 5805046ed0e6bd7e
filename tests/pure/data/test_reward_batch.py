"""Reward-model micro-batches: pair layout, last-token indices, PRM labels, epoch orders."""
import pytest
import torch

from pure import rng
from pure.data.preference import build_preference_strategy
from pure.data.reward_batch import collate_reward_pairs, collate_token_labels, epoch_order
from pure.data.settings import IGNORE_INDEX, DataError, DataSettings

PAD = 0
PAIRS = [
    {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8]},
    {"chosen_input_ids": [9], "rejected_input_ids": [9, 10, 11, 12]},
    {"chosen_input_ids": [13, 14], "rejected_input_ids": [15, 16, 17]},
]


def test_pairs_are_chosen_rows_then_rejected_rows_right_padded():
    first, last = collate_reward_pairs(PAIRS, [1, 0, 2], 2, PAD)
    assert first["input_ids"].tolist() == [
        [9, 0, 0, 0],  # chosen of pair 1
        [5, 6, 7, 0],  # chosen of pair 0
        [9, 10, 11, 12],  # rejected of pair 1
        [5, 8, 0, 0],  # rejected of pair 0
    ]
    assert first["last_index"].tolist() == [0, 2, 3, 1]
    assert first["num_pairs"] == 2 and first["num_tokens"] == 1 + 3 + 4 + 2
    assert last["input_ids"].tolist() == [[13, 14, 0], [15, 16, 17]] and last["num_pairs"] == 1
    assert "margin" not in first
    padded = collate_reward_pairs(PAIRS, [0], 1, PAD, pad_to=6)[0]
    assert padded["input_ids"].shape == (2, 6) and padded["last_index"].tolist() == [2, 1]


def test_margins_travel_with_their_pairs_and_must_be_all_or_none():
    with_margin = [dict(p, margin=m) for p, m in zip(PAIRS, [0.5, 1.5, 2.5])]
    (batch,) = collate_reward_pairs(with_margin, [2, 0, 1], 3, PAD)
    assert batch["margin"].tolist() == [2.5, 0.5, 1.5] and batch["margin"].dtype == torch.float32
    with pytest.raises(DataError, match=r"reward examples \[1\] have no 'margin'"):
        collate_reward_pairs([*with_margin[:1], PAIRS[1]], [0, 1], 2, PAD)


def test_bad_pairs_name_the_example_and_field():
    with pytest.raises(DataError, match="reward example 1: missing field 'rejected_input_ids'"):
        collate_reward_pairs([PAIRS[0], {"chosen_input_ids": [1]}], [0, 1], 2, PAD)
    with pytest.raises(DataError, match="reward example 0: field 'chosen_input_ids' is empty"):
        collate_reward_pairs([{"chosen_input_ids": [], "rejected_input_ids": [3]}], [0], 1, PAD)
    with pytest.raises(DataError, match="does not fit pad_to=3"):
        collate_reward_pairs(PAIRS, [1], 1, PAD, pad_to=3)


def test_score_position_skips_trailing_pad_tokens_like_transformers():
    # pad == eos (SmolLM2's <|im_end|>): a sequence ending with it is scored at the token before,
    # the position LlamaForSequenceClassification reads at inference.
    eos = 2
    (batch,) = collate_reward_pairs([{"chosen_input_ids": [5, 6, eos], "rejected_input_ids": [5, eos]}], [0], 1, eos)
    assert batch["last_index"].tolist() == [1, 0]
    assert batch["num_tokens"] == 5


def test_token_labels_are_padded_with_ignore_and_counted():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, -100, 1]},
                {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, 0, -100, -100, 1]}]
    (batch,) = collate_token_labels(examples, [1, 0], 2, PAD)
    assert batch["input_ids"].tolist() == [[8, 9, 10, 11, 12], [5, 6, 7, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 0, -100, -100, 1], [-100, -100, 1, -100, -100]]
    assert batch["num_tokens"] == 8 and batch["num_labelled"] == 3


def test_token_labels_are_checked():
    with pytest.raises(DataError, match="example 0: 2 input_ids but 3 labels"):
        collate_token_labels([{"input_ids": [1, 2], "labels": [-100, 0, 1]}], [0], 1, PAD)
    with pytest.raises(DataError, match=r"example 0: label 2 is outside \[0, 2\)"):
        collate_token_labels([{"input_ids": [1, 2], "labels": [-100, 2]}], [0], 1, PAD, num_labels=2)


def test_epoch_order_is_a_permutation_keyed_by_seed_and_epoch():
    order = epoch_order(10, seed=42, epoch=3)
    assert sorted(order) == list(range(10))
    assert order == rng.permutation(rng.fold_in(rng.key(42), 3), 10).tolist()
    assert order == epoch_order(10, seed=42, epoch=3)
    assert order != epoch_order(10, seed=42, epoch=4)


def test_preference_rows_to_reward_batches(smollm_tokenizer):
    tok = smollm_tokenizer
    rm = build_preference_strategy("rm", "bradley_terry.chat_template", {"path": "t"}, tok,
                                   DataSettings(chat_template="chatml"))
    rows = [{"input": q, "chosen": "Yes.", "rejected": "No, never."} for q in ["A?", "B c?"]]
    examples = [rm(row, i)[0] for i, row in enumerate(rows)]
    (batch,) = collate_reward_pairs(examples, [0, 1], 2, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0, : len(examples[0]["chosen_input_ids"])].tolist() == examples[0]["chosen_input_ids"]
    assert batch["input_ids"][3, : len(examples[1]["rejected_input_ids"])].tolist() == examples[1]["rejected_input_ids"]

    prm = build_preference_strategy("prm", "stepwise_supervised", {"path": "t", "train_on_last_step_only": True},
                                    tok, DataSettings())
    row = {"prompt": "2+2?", "completions": ["2+2=4", "so 4"], "labels": [True, False]}
    (batch,) = collate_token_labels(prm(row, 0), [0], 1, tok.pad_token_id, num_labels=2)
    labelled = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert labelled.tolist() == [0] and batch["labels"][0, -1].item() == 0  # the last step's separator

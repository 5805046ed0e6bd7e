"""KTO micro-batches: rows, masks, labels, and the epoch-shifted mismatched KL rows."""
import pytest
import torch

from pure import rng
from pure.data.kto_batch import collate_kto, kto_micro_batches
from pure.data.settings import DataError

EXAMPLES = [
    {"prompt_ids": [1, 2, 3], "completion_ids": [10, 11], "label": True},
    {"prompt_ids": [4], "completion_ids": [12, 13, 14], "label": False},
    {"prompt_ids": [5, 6], "completion_ids": [15], "label": True},
    {"prompt_ids": [7, 8, 9, 9], "completion_ids": [16, 17], "label": False},
]


def unpad(ids, labels):
    """(prompt, completion) of a right-padded row, read back from its labels."""
    trained = (labels != -100).nonzero()[:, 0]
    start, end = int(trained[0]), int(trained[-1]) + 1
    return ids[:start].tolist(), ids[start:end].tolist()


def test_rows_are_prompt_plus_completion_with_masked_prompt_and_padding():
    (batch,) = collate_kto(EXAMPLES, [0, 1, 2, 3], 4, pad_id=0)
    assert batch["input_ids"].shape == (4, 6) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == [4, 12, 13, 14, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 12, 13, 14, -100, -100]
    assert batch["kto_label"].dtype == torch.bool and batch["kto_label"].tolist() == [True, False, True, False]
    assert (batch["num_rows"], batch["num_tokens"], batch["num_trained"]) == (4, 5 + 4 + 3 + 6, 2 + 3 + 1 + 2)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_kl_rows_pair_each_prompt_with_the_previous_completion_in_epoch_order(size):
    order = [2, 0, 3, 1]
    batches = collate_kto(EXAMPLES, order, size, pad_id=0)
    assert [b["num_rows"] for b in batches] == [min(size, 4 - s) for s in range(0, 4, size)]
    kl_rows = [unpad(ids, labels) for b in batches for ids, labels in zip(b["kl_input_ids"], b["kl_labels"])]
    main_rows = [unpad(ids, labels) for b in batches for ids, labels in zip(b["input_ids"], b["labels"])]
    for j, (prompt, completion) in enumerate(kl_rows):
        assert prompt == EXAMPLES[order[j]]["prompt_ids"]
        assert completion == EXAMPLES[order[j - 1]]["completion_ids"]  # j = 0 wraps to the last
        assert completion != main_rows[j][1]  # mismatched, even with one row per micro-batch


def test_max_length_cuts_kl_completions_and_refuses_long_main_rows():
    batches = collate_kto(EXAMPLES, [1, 3], 1, pad_id=0, max_length=6)
    prompt, completion = unpad(batches[1]["kl_input_ids"][0], batches[1]["kl_labels"][0])
    assert prompt == [7, 8, 9, 9] and completion == [12, 13]  # [12, 13, 14] cut to 6 - 4 tokens
    with pytest.raises(DataError, match="example 3.*max_length 5"):
        collate_kto(EXAMPLES, [3], 1, pad_id=0, max_length=5)


@pytest.mark.parametrize("bad, match", [
    ({"prompt_ids": [1], "completion_ids": [2]}, "missing `label`"),
    ({"prompt_ids": [1], "completion_ids": [], "label": True}, "`completion_ids` is empty"),
    ({"prompt_ids": [], "completion_ids": [2], "label": True}, "`prompt_ids` is empty"),
    ({"prompt_ids": [1], "completion_ids": [2], "label": "yes"}, "`label` must be a bool"),
])
def test_bad_examples_are_named(bad, match):
    with pytest.raises(DataError, match="KTO example 1: " + match):
        collate_kto([EXAMPLES[0], bad], [0, 1], 2, pad_id=0)
    with pytest.raises(DataError, match="names example 7"):
        collate_kto(EXAMPLES, [0, 7], 2, pad_id=0)


def test_epoch_order_is_the_keyed_permutation():
    batches = kto_micro_batches(EXAMPLES, 2, pad_id=0, seed=5, epoch=3)
    order = rng.permutation(rng.fold_in(rng.key(5), 3), 4).tolist()
    expected = collate_kto(EXAMPLES, order, 2, pad_id=0)
    for got, want in zip(batches, expected):
        for name in ("input_ids", "labels", "kto_label", "kl_input_ids", "kl_labels"):
            assert torch.equal(got[name], want[name])
    other = [kto_micro_batches(EXAMPLES, 4, 0, seed=5, epoch=e)[0]["input_ids"] for e in range(4)]
    assert any(not torch.equal(other[0], o) for o in other[1:])  # epochs reshuffle

"""Pair micro-batches: chosen rows then rejected rows, minimal right padding, prompt masked."""
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from pure import rng
from pure.data.pair_batch import collate_pairs, pair_micro_batches
from pure.data.settings import DataError

EXAMPLES = [
    {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 9], "rejected_ids": [5, 9]},
    {"prompt_ids": [6], "chosen_ids": [7, 9], "rejected_ids": [8, 8, 8, 9]},
    {"prompt_ids": [10, 11, 12], "chosen_ids": [9], "rejected_ids": [13, 9]},
]


def test_golden_collate_output():
    first, last = collate_pairs(EXAMPLES, order=[1, 0, 2], micro_batch_size=2, pad_id=0)
    assert first["input_ids"].tolist() == [[6, 7, 9, 0, 0], [1, 2, 3, 4, 9], [6, 8, 8, 8, 9], [1, 2, 5, 9, 0]]
    assert first["labels"].tolist() == [
        [-100, 7, 9, -100, -100], [-100, -100, 3, 4, 9], [-100, 8, 8, 8, 9], [-100, -100, 5, 9, -100]]
    assert first["last_index"].tolist() == [2, 4, 4, 3]
    assert first["num_pairs"] == 2 and first["num_tokens"] == 17
    # The trailing partial micro-batch is kept, padded only to its own longest row.
    assert last["input_ids"].tolist() == [[10, 11, 12, 9, 0], [10, 11, 12, 13, 9]]
    assert last["labels"].tolist() == [[-100, -100, -100, 9, -100], [-100, -100, -100, 13, 9]]
    assert last["last_index"].tolist() == [3, 4] and last["num_pairs"] == 1 and last["num_tokens"] == 9
    assert first["input_ids"].dtype == first["labels"].dtype == first["last_index"].dtype == torch.long


ids = st.lists(st.integers(1, 50), min_size=1, max_size=7)
example = st.fixed_dictionaries({"prompt_ids": st.lists(st.integers(1, 50), max_size=6), "chosen_ids": ids,
                                 "rejected_ids": ids})


@hsettings(max_examples=60, deadline=None)
@given(st.lists(example, min_size=1, max_size=7), st.integers(1, 4), st.randoms(use_true_random=False))
def test_rows_are_prompt_plus_completion_and_labels_are_ids_or_ignored(examples, size, random):
    order = list(range(len(examples)))
    random.shuffle(order)
    batches = collate_pairs(examples, order, size, pad_id=0)
    assert len(batches) == -(-len(examples) // size)
    seen = []
    for mb in batches:
        b = mb["num_pairs"]
        group, seen = order[len(seen):len(seen) + b], seen + order[len(seen):len(seen) + b]
        assert mb["input_ids"].shape[0] == 2 * b
        lengths = []
        for row in range(2 * b):
            ex = examples[group[row % b]]
            completion = ex["chosen_ids"] if row < b else ex["rejected_ids"]
            full = ex["prompt_ids"] + completion
            lengths.append(len(full))
            got_ids, got_labels = mb["input_ids"][row].tolist(), mb["labels"][row].tolist()
            assert got_ids[:len(full)] == full and set(got_ids[len(full):]) <= {0}
            assert got_labels == [-100] * len(ex["prompt_ids"]) + completion + [-100] * (len(got_ids) - len(full))
            assert all(lab == -100 or lab == tok for lab, tok in zip(got_labels, got_ids))
            assert mb["last_index"][row] == len(full) - 1
        assert mb["input_ids"].shape[1] == max(lengths)  # minimal padding
        assert mb["num_tokens"] == sum(lengths)
    assert seen == order


def test_epoch_order_is_the_keyed_permutation():
    examples = [{"prompt_ids": [i + 1], "chosen_ids": [9], "rejected_ids": [8, 9]} for i in range(20)]
    batches = pair_micro_batches(examples, micro_batch_size=3, pad_id=0, seed=7, epoch=2)
    firsts = [p for mb in batches for p in mb["input_ids"][:mb["num_pairs"], 0].tolist()]
    expected = rng.permutation(rng.fold_in(rng.key(7), 2), 20).tolist()
    assert firsts == [i + 1 for i in expected]
    again = pair_micro_batches(examples, micro_batch_size=3, pad_id=0, seed=7, epoch=2)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(batches, again))
    other_epoch = pair_micro_batches(examples, micro_batch_size=3, pad_id=0, seed=7, epoch=3)
    assert [p for mb in other_epoch for p in mb["input_ids"][:mb["num_pairs"], 0].tolist()] != firsts
    in_order = pair_micro_batches(examples, micro_batch_size=3, pad_id=0, seed=7, epoch=2, shuffle=False)
    assert [p for mb in in_order for p in mb["input_ids"][:mb["num_pairs"], 0].tolist()] == list(range(1, 21))


def test_bad_examples_name_the_row_and_field():
    with pytest.raises(DataError, match=r"example 1: missing field 'rejected_ids'"):
        collate_pairs([EXAMPLES[0], {"prompt_ids": [1], "chosen_ids": [2]}], [0, 1], 2, 0)
    with pytest.raises(DataError, match=r"example 0: field 'chosen_ids' is empty"):
        collate_pairs([{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]}], [0], 1, 0)
    with pytest.raises(DataError, match=r"example 0: field 'prompt_ids' must be a list of token ids"):
        collate_pairs([{"prompt_ids": "hi", "chosen_ids": [1], "rejected_ids": [2]}], [0], 1, 0)

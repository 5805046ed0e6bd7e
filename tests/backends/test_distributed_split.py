"""backends.distributed.split_documents: a packed micro-batch cut into each rank's documents."""
import numpy as np
import pytest
import torch

from backends.distributed import shard_micro_batches, split_documents
from pure.data.packing import collate_packed

LENGTHS = (5, 3, 7, 2, 6, 4)


def packed() -> dict:
    examples = [{"input_ids": list(range(10 * i, 10 * i + n)), "labels": list(range(10 * i, 10 * i + n))}
                for i, n in enumerate(LENGTHS)]
    bins = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5])]
    return {k: v for k, v in collate_packed(examples, bins, 3, 12, pad_id=0)[0].items() if isinstance(v, torch.Tensor)}


def documents(mb: dict) -> list[tuple]:
    """Each document of a packed batch as (input ids, labels, positions), in order."""
    out = []
    for r in range(mb["segment_ids"].shape[0]):
        for s in torch.unique(mb["segment_ids"][r][mb["segment_ids"][r] > 0]).tolist():
            at = mb["segment_ids"][r] == s
            out.append(tuple(tuple(mb[k][r][at].tolist()) for k in ("input_ids", "labels", "positions")))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_the_ranks_documents_are_the_batch_whole_and_in_order_with_about_equal_tokens(world):
    mb = packed()
    parts = [split_documents(mb, rank, world) for rank in range(world)]
    assert [d for p in parts for d in documents(p)] == documents(mb)
    tokens = [int((p["segment_ids"] > 0).sum()) for p in parts]
    assert sum(tokens) == sum(LENGTHS)
    if world <= 3:  # each rank within one document of an equal share
        assert max(tokens) - min(tokens) <= max(LENGTHS)
    for p in parts:
        assert p["input_ids"].shape[1] == 12 and set(p) == set(mb)


def test_at_world_size_1_the_batch_is_returned_as_it_was():
    mb = packed()
    (same,) = shard_micro_batches([mb], 0, 1)
    assert all(torch.equal(same[k], mb[k]) for k in mb)


def test_a_rank_without_documents_gets_zero_rows_and_one_row_splits_by_documents():
    mb = packed()
    one_row = {k: v[2:] for k, v in mb.items()}  # 3 documents of 2, 6 and 4 tokens in one row
    parts = shard_micro_batches([one_row], 0, 2) + shard_micro_batches([one_row], 1, 2)
    assert [int((p["segment_ids"] > 0).sum()) for p in parts] == [8, 4]
    assert [split_documents(one_row, r, 4)["input_ids"].shape[0] for r in range(4)] == [1, 1, 0, 1]


def test_a_batch_with_other_keys_splits_by_rows():
    mb = {**packed(), "weights": torch.ones(3)}
    first, second = shard_micro_batches([mb], 0, 2)[0], shard_micro_batches([mb], 1, 2)[0]
    assert first["input_ids"].shape[0] == 2 and second["input_ids"].shape[0] == 1

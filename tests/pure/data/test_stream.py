"""Buffered shuffle and buffered packing of example streams: permutations, determinism, resume by skip."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from pure.data.settings import IGNORE_INDEX
from pure.data.stream import StreamBatching, buffered_shuffle, join_documents, stream_micro_batches


def docs(lengths):
    """Examples whose tokens say which document and position they are (doc * 1000 + position)."""
    return [{"input_ids": [d * 1000 + p for p in range(n)], "labels": [d * 1000 + p for p in range(n)]}
            for d, n in enumerate(lengths, start=1)]


def real_tokens(batches):
    """Per document id, its tokens in the order the batches hold them."""
    seen: dict[int, list[int]] = {}
    for b in batches:
        for row_ids, row_seg in zip(b["input_ids"].tolist(), b["segment_ids"].tolist()):
            for token, segment in zip(row_ids, row_seg):
                if segment:
                    seen.setdefault(token // 1000, []).append(token)
    return seen


# --- buffered_shuffle ---------------------------------------------------------------------------


@hsettings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), buffer=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_buffered_shuffle_is_a_permutation_that_moves_items_at_most_a_buffer_earlier(n, buffer, seed):
    out = list(buffered_shuffle(range(n), buffer, [seed]))
    assert sorted(out) == list(range(n))
    # an item leaves the buffer no earlier than when it entered it
    assert all(position >= item - buffer for position, item in enumerate(out))


def test_buffered_shuffle_is_deterministic_and_seeded():
    a = list(buffered_shuffle(range(1000), 100, [7, 0]))
    assert a == list(buffered_shuffle(range(1000), 100, [7, 0]))
    assert a != list(buffered_shuffle(range(1000), 100, [7, 1]))
    assert a != list(range(1000))


def test_buffer_of_one_keeps_the_order():
    assert list(buffered_shuffle(range(50), 1, [3])) == list(range(50))


def test_buffered_shuffle_rejects_an_empty_buffer():
    with pytest.raises(ValueError, match="buffer_size"):
        list(buffered_shuffle(range(3), 0, [0]))


# --- stream_micro_batches -----------------------------------------------------------------------

PACKED = StreamBatching(sequence_len=64, micro_batch_size=3, pad_id=0, packing=True, buffer_size=25)


@hsettings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=120), buffer=st.integers(1, 40),
       micro=st.integers(1, 4), seed=st.integers(0, 1000))
def test_packing_a_stream_loses_splits_and_reorders_nothing(lengths, buffer, micro, seed):
    how = StreamBatching(sequence_len=64, micro_batch_size=micro, pad_id=0, buffer_size=buffer)
    batches = list(stream_micro_batches(docs(lengths), how, seed=seed))
    assert real_tokens(batches) == {d: [d * 1000 + p for p in range(n)] for d, n in enumerate(lengths, start=1)}
    assert all(b["input_ids"].shape[1] == 64 for b in batches)
    assert all(b["input_ids"].shape[0] == micro for b in batches[:-1])  # only the last may be short
    for b in batches:  # positions restart per document; the first token of each document is unpredicted
        starts = (b["positions"] == 0) & (b["segment_ids"] > 0)
        assert (b["labels"][starts] == IGNORE_INDEX).all()
        assert b["num_tokens"] == int((b["segment_ids"] > 0).sum())


def test_stream_batches_are_deterministic_per_seed_and_epoch():
    stream = docs([5, 17, 40, 3, 64, 22, 9] * 10)
    a = list(stream_micro_batches(stream, PACKED, seed=1, epoch=0))
    b = list(stream_micro_batches(stream, PACKED, seed=1, epoch=0))
    c = list(stream_micro_batches(stream, PACKED, seed=1, epoch=1))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b)) and len(a) == len(b)
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_skip_resumes_with_exactly_the_remaining_batches():
    stream = docs([5, 17, 40, 3, 64, 22, 9] * 10)
    full = list(stream_micro_batches(stream, PACKED, seed=4))
    for skip in (0, 1, 5, len(full), len(full) + 3):
        rest = list(stream_micro_batches(stream, PACKED, seed=4, skip=skip))
        assert len(rest) == max(0, len(full) - skip)
        for x, y in zip(full[skip:], rest):
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "positions", "segment_ids"))


def test_each_buffer_is_packed_on_its_own():
    # 100 documents of 16 tokens (4 fill a row of 64): buffers of 20 pack into 5 full rows each;
    # buffers of 25 leave one document alone in a row per buffer (what a bigger buffer avoids).
    how = StreamBatching(sequence_len=64, micro_batch_size=3, pad_id=0, buffer_size=20)
    batches = list(stream_micro_batches(docs([16] * 100), how, seed=0))
    assert sum(b["input_ids"].shape[0] for b in batches) == 25
    assert all((b["segment_ids"] > 0).all() for b in batches)
    batches = list(stream_micro_batches(docs([16] * 100), PACKED, seed=0))
    assert sum(b["input_ids"].shape[0] for b in batches) == 4 * 7


def test_unpacked_rows_keep_the_stream_order_and_pad_to_the_longest():
    how = StreamBatching(sequence_len=64, micro_batch_size=2, pad_id=0, packing=False, pad_to_sequence_len=False)
    batches = list(stream_micro_batches(docs([3, 7, 5]), how, seed=0))
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 7]), torch.Size([1, 5])]
    assert batches[0]["input_ids"][:, 0].tolist() == [1000, 2000]
    assert batches[0]["input_ids"][0, 3:].tolist() == [0, 0, 0, 0]


def test_group_by_length_sorts_rows_longest_first():
    how = StreamBatching(sequence_len=64, micro_batch_size=2, pad_id=0, packing=False, bucket_by_length=True,
                         pad_to_sequence_len=False)
    batches = list(stream_micro_batches(docs([3, 7, 5, 9]), how, seed=0))
    assert [b["input_ids"].shape[1] for b in batches] == [9, 5]


def test_join_documents_makes_one_segment_per_row():
    (batch,) = list(stream_micro_batches(docs([3, 4]), PACKED, seed=0))
    joined = join_documents(batch)
    row = int(np.argmax((batch["segment_ids"] > 0).sum(1).numpy()))
    n = int((batch["segment_ids"][row] > 0).sum())
    assert joined["segment_ids"][row, :n].tolist() == [1] * n and joined["segment_ids"][row, n:].sum() == 0
    assert joined["positions"][row, :n].tolist() == list(range(n))
    assert torch.equal(joined["labels"], batch["labels"])

"""Length policy: drop / truncate / raise for long rows, drop short and untrained rows, count each."""
import pytest

from pure.data.length import apply_length_policy
from pure.data.settings import IGNORE_INDEX, DataError, DataSettings


def _ex(n, trained=True):
    ids = list(range(10, 10 + n))
    return {"input_ids": ids, "labels": ids if trained else [IGNORE_INDEX] * n, "attention_mask": [1] * n}


EXAMPLES = [_ex(4), _ex(9), _ex(1), _ex(5, trained=False), _ex(6)]


def test_drop_is_the_default_and_every_kind_is_counted():
    kept, stats = apply_length_policy(EXAMPLES, DataSettings(sequence_len=8), "data.jsonl")
    assert kept == [EXAMPLES[0], EXAMPLES[4]]
    assert (stats.total, stats.kept, stats.dropped_too_long, stats.dropped_too_short, stats.dropped_untrained,
            stats.truncated) == (5, 2, 1, 1, 1, 0)
    assert stats.dropped == 3
    assert stats.summary() == ("data.jsonl: kept 2 of 5 examples (1 longer than 8 tokens dropped; "
                               "1 shorter than 2 tokens dropped; 1 with no trained token dropped)")


def test_truncate_cuts_every_per_token_list():
    kept, stats = apply_length_policy(EXAMPLES, DataSettings(sequence_len=8, excess_length_strategy="truncate"), "d")
    assert stats.truncated == 1 and stats.kept == 3
    assert kept[1] == {key: value[:8] for key, value in EXAMPLES[1].items()}


def test_raise_names_dataset_and_row():
    with pytest.raises(DataError, match=r"dataset 'd' row 1: 9 tokens is longer than sequence_len=8"):
        apply_length_policy(EXAMPLES, DataSettings(sequence_len=8, excess_length_strategy="raise"), "d")


def test_min_sample_len_and_truncation_to_untrained():
    prompt_only_tail = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX] * 2 + [3, 4]}
    settings = DataSettings(sequence_len=2, excess_length_strategy="truncate", min_sample_len=2)
    kept, stats = apply_length_policy([prompt_only_tail], settings, "d")
    assert kept == [] and stats.truncated == 1 and stats.dropped_untrained == 1
    kept, stats = apply_length_policy([_ex(3)], DataSettings(min_sample_len=4), "d")
    assert kept == [] and stats.dropped_too_short == 1


def test_unknown_strategy_is_an_error():
    with pytest.raises(DataError, match="excess_length_strategy 'clip'"):
        apply_length_policy([], DataSettings(excess_length_strategy="clip"), "d")

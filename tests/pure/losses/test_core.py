"""`Loss`: each loss carries its normaliser; sums merge the normalisers, scaling keeps them, and a
missing total is an error rather than the micro-batch's own count."""
import pytest
import torch

from pure import rng
from pure.data.pair_batch import collate_pairs
from pure.losses import Loss, count_pairs, count_targets, dpo, kto, kto_batch_stats, nll, pair_nll, sft
from pure.models import init
from pure.train import make_apply
from tests.tiny import TINY

CONFIG = TINY.replace(num_hidden_layers=1)


def pair_batches(sizes=(2, 1)):
    ids = rng.randint(rng.key(0), 3, CONFIG.vocab_size, (3, 3, 4)).tolist()
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in ids]
    return [collate_pairs(examples, range(3), size, pad_id=0)[0] for size in sizes]


def test_built_in_losses_carry_their_own_counts():
    assert sft.count_fn is count_targets and nll.count_fn is count_targets
    assert dpo.count_fn is count_pairs and pair_nll.count_fn is count_pairs
    assert kto.batch_stats_fn is kto_batch_stats


def test_a_sum_merges_the_counts_of_its_terms_and_scaling_keeps_them():
    batches = pair_batches()
    summed = dpo + 0.5 * nll
    counts = summed.count_fn(batches)
    assert counts == {**count_pairs(batches), **count_targets(batches)}
    assert counts["total_pairs"].item() == 3
    assert (0.5 * dpo).count_fn is count_pairs and (dpo + pair_nll).count_fn is count_pairs


def test_terms_that_count_a_total_differently_are_refused_by_name():
    def rows_as_pairs(micro_batches):
        return {"total_pairs": torch.tensor(sum(int(mb["input_ids"].shape[0]) for mb in micro_batches))}

    other = Loss(dpo.fn, "rows_dpo", count_fn=rows_as_pairs)
    with pytest.raises(ValueError, match=r"'dpo' and 'rows_dpo' disagree on the count 'total_pairs'"):
        (dpo + other).count_fn(pair_batches())


def test_a_missing_total_is_an_error_not_the_micro_batch_count():
    batch = pair_batches((3,))[0]
    apply = make_apply(CONFIG, init(CONFIG, rng.key(1)))({})
    with pytest.raises(ValueError, match="dpo: the micro-batch has no 'total_pairs'"):
        dpo(apply, batch)
    value, _ = dpo.on_batch(apply, batch)
    assert value.item() == pytest.approx(0.6931472, rel=1e-6)  # policy == reference: -log sigmoid(0) = log 2

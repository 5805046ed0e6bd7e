"""Supervised fine-tuning: next-token cross-entropy over the trained (label != -100) tokens."""
from __future__ import annotations

from pure.losses.common import IGNORE_INDEX, batch_total, count_targets, next_token_targets
from pure.losses.core import Loss


def sft_loss(apply, batch, key=None):
    """L = -(1/N) sum_t log p(y_t | y_<t) over the N trained tokens of the whole accumulated batch.

    `batch["total_target_tokens"]` is N for the full (accumulated) batch, set by the train step from
    `count_targets`, so the sum of micro-batch losses is the mean over all trained tokens whatever the micro-batching.
    lm_head runs only where there is a target, through `apply.token_logprobs` (the fused kernel when
    one was injected into `make_apply`: no [tokens, vocab] logits).
    """
    targets = next_token_targets(batch["labels"], batch.get("segment_ids"))
    mask = targets != IGNORE_INDEX
    out = apply(batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                compute_logits=False, key=key)
    head = apply.token_logprobs(out.hidden[mask], targets[mask])
    nll = -head.logprobs.sum()
    normalizer = batch_total(batch, "total_target_tokens", "sft")
    # Summed over micro-batches, both metrics are those of the whole accumulated batch.
    correct = head.target_is_argmax.sum()
    return nll / normalizer, {"num_trained_tokens": mask.sum(), "token_accuracy": correct / normalizer}


sft = Loss(sft_loss, "sft", count_fn=count_targets)
nll = Loss(sft_loss, "nll", count_fn=count_targets)

"""One function per objective (see the modules) and the shared token log-prob helpers."""
from pure.losses.common import next_token_targets, sequence_logprobs, token_logprobs
from pure.losses.core import Loss
from pure.losses.sft import nll, sft, sft_loss

__all__ = ["Loss", "next_token_targets", "nll", "sequence_logprobs", "sft", "sft_loss", "token_logprobs"]

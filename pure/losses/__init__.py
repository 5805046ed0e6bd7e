"""One module per objective and the shared helpers; every objective is a composable `Loss` that
carries its own normaliser (`count_fn`: count_targets, count_pairs, count_kto, ...).

    sft, nll                 next-token cross-entropy (pure.losses.sft)
    dpo family               make_dpo / build_dpo_loss (sigmoid, ipo, hinge, ...), pair_nll (RPO)
    kto                      make_kto, with the KL baseline kto_kl_baseline
    grpo family              make_grpo (grpo, bnpo, dr_grpo, dapo, cispo, sapo; GSPO's sequence level)
    orpo, simpo, cpo         reference-free pair objectives
    bradley_terry, prm       reward models (scalar head, token head)
"""
from pure.losses.common import completion_logps, count_targets, next_token_targets, sequence_logprobs, token_logprobs
from pure.losses.core import Loss
from pure.losses.dpo import build_dpo_loss, dpo_losses, make_dpo, pair_nll, pair_reference_logps
from pure.losses.grpo import count_grpo, grpo_token_losses, make_grpo, reduce_grpo_loss
from pure.losses.kto import count_kto, kto, kto_batch_stats, kto_kl_baseline, make_kto
from pure.losses.orpo import make_orpo, orpo
from pure.losses.pairs import count_pairs, pair_logps
from pure.losses.reward import (bradley_terry, center_rewards, count_reward_pairs, count_token_labels,
                                make_bradley_terry, make_prm, prm)
from pure.losses.sft import nll, sft, sft_loss
from pure.losses.simpo import cpo, make_cpo, make_simpo, simpo

dpo = make_dpo()
ipo = build_dpo_loss(rl="ipo")
grpo = make_grpo()

__all__ = [
    "Loss", "bradley_terry", "build_dpo_loss", "center_rewards", "completion_logps", "count_grpo", "count_kto",
    "count_pairs", "count_reward_pairs", "count_targets", "count_token_labels", "cpo", "dpo", "dpo_losses", "grpo",
    "grpo_token_losses", "ipo", "kto", "kto_batch_stats", "kto_kl_baseline", "make_bradley_terry", "make_cpo",
    "make_dpo", "make_grpo", "make_kto", "make_orpo", "make_prm", "make_simpo", "next_token_targets", "nll", "orpo",
    "pair_logps", "pair_nll", "pair_reference_logps", "prm", "reduce_grpo_loss", "sequence_logprobs", "sft",
    "sft_loss", "simpo", "token_logprobs",
]

"""Score heads of reward models: a linear map from the final-normed hidden states to `num_labels` scores.

They are transformers' heads, as pure functions over the params pytree under the same HF names:

- sequence classification (`LlamaForSequenceClassification`, outcome reward models, `num_labels: 1`):
  `score = Linear(hidden_size, num_labels, bias=False)` read at the *last non-pad token* of each row,
  the rightmost position whose token is not `pad_token_id` (`last_non_pad_index`);
- token classification (`LlamaForTokenClassification`, process reward models, `num_labels: 2`):
  `dropout(p = classifier_dropout, default 0.1)` then `score = Linear(hidden_size, num_labels)` *with* a
  bias (transformers' `token_classification_bias` defaults to true) at every position.

The head params are `{"score.weight": [L, E]}` (plus `"score.bias": [L]` for token classification);
they sit in the trainable params next to the model's, so `backends.export` writes them under the
names transformers loads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pure import rng
from pure.models.config import ModelConfig

HEAD_KINDS = ("sequence", "token")


def init_score_head(config: ModelConfig, num_labels: int, key: torch.Tensor, kind: str = "sequence",
                    dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """`{"score.weight": W}` with W ~ N(0, initializer_range^2) of shape [num_labels, hidden_size], as
    transformers' `_init_weights` draws a new Linear; `kind="token"` adds `"score.bias"` = zeros [num_labels]."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"init_score_head: kind must be one of {HEAD_KINDS}, got {kind!r}")
    if num_labels < 1:
        raise ValueError(f"init_score_head: num_labels must be >= 1, got {num_labels}")
    head = {"score.weight": rng.normal(key, (num_labels, config.hidden_size), dtype=dtype, device=device,
                                       std=config.initializer_range)}
    if kind == "token":
        head["score.bias"] = torch.zeros(num_labels, dtype=dtype, device=device)
    return head


def last_non_pad_index(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Long [B]: the rightmost position of each row whose token is not `pad_id`, transformers' rule.

    `argmax(t * [token_t != pad])` over t, so right- and left-padded rows both work; a row that is all
    padding gives 0. With no pad id every row uses its last position (as transformers does). When the
    pad token is also EOS and a sequence ends with EOS, the score is read at the token before it, which
    is what the exported model will do at inference.
    """
    B, T = input_ids.shape
    if pad_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def sequence_scores(hidden: torch.Tensor, last_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """scores[b] = W h[b, last_index[b]]: hidden [B, T, E], last_index Long [B], W [L, E] -> [B, L].

    Only the selected position goes through the head (transformers projects every position and then
    picks one; the linear map is per position, so the result is the same).
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return F.linear(hidden[rows, last_index], weight)


def token_scores(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 dropout: float = 0.0, key: torch.Tensor | None = None) -> torch.Tensor:
    """scores = W dropout(h) + b over the last dim: hidden [..., E] -> [..., L].

    Dropout (`rng.dropout`: keep with probability about 1 - p, kept values scaled by its inverse)
    applies only when `key` is given, as transformers' `nn.Dropout` applies only in training mode.
    Pass `hidden[mask]` to score just the labelled positions: dropout is independent per element,
    so this has the same law as scoring every position and selecting afterwards.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"token_scores: dropout must be in [0, 1), got {dropout}")
    if dropout > 0.0 and key is not None:
        hidden = rng.dropout(key, hidden, dropout)
    return F.linear(hidden, weight, bias)

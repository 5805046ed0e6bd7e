"""The explicit train state and the pure train step.

    state, metrics = train_step(state, micro_batches)

`TrainState` holds everything a run's future depends on: the step, the trainable params, the
optimizer state, the RNG key and the data cursor. The step splits the key; nothing else draws
randomness, so (config, state) determines the rest of the run and resume is bitwise exact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pure import rng
from pure.linear_ce import TokenLogprobFn, TokenLogprobs, reference_token_logprobs
from pure.losses.core import Loss
from pure.lora import LoraConfig
from pure.models.config import ModelConfig
from pure.models.llama import ModelOutput, forward, lm_head_weight, sdpa_attention
from pure.optim import apply_updates, grad_norm_from_state
from pure.tree import global_norm, tree_leaves, tree_map


@dataclass(frozen=True)
class TrainState:
    """step: optimizer steps taken. trainable: `{"params": {...}, "lora": {...}}` (either may be
    empty). data_cursor: where the data stream stands (epoch, batch index), plain ints.
    carry: what a program carries from one step to the next beyond the optimizer (GRPO's buffered
    generation batch: completions, advantages, old log-probs), a flat `{name: tensor | JSON value}`
    whose names and shapes change during the run, so a checkpoint restores it as saved.

    Frozen: a step returns a new state. Every field is checkpointed (`backends.checkpoint` walks
    `dataclasses.fields`), so a field added here is saved and restored with no other change."""

    step: int
    trainable: dict
    opt_state: Any
    rng_key: torch.Tensor
    data_cursor: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0})
    loss_scale: dict | None = None  # `LossScaling.init()` for fp16 mixed precision, else None
    carry: dict = field(default_factory=dict)

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)


def init_train_state(trainable: dict, optimizer, key: torch.Tensor,
                     loss_scaling: "LossScaling | None" = None) -> TrainState:
    return TrainState(step=0, trainable=trainable, opt_state=optimizer.init(trainable), rng_key=key,
                      loss_scale=loss_scaling.init() if loss_scaling is not None else None)


@dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling for fp16 mixed precision, with `torch.amp.GradScaler`'s rule and defaults.

    The step multiplies the loss by `scale` before differentiating (so small fp16 activation
    gradients do not flush to zero), divides the accumulated gradient by it, and then:
    - all gradients finite: the update is applied; after `growth_interval` such steps in a row
      the scale is multiplied by `growth_factor`;
    - any inf/NaN: the update is skipped (params and optimizer state, including its bias-correction
      count, stay as they were) and the scale is multiplied by `backoff_factor`.
    A skipped step still consumes its data and counts as a step for the loop and the LR schedule,
    as in PyTorch's AMP recipe (`scaler.step(opt); scaler.update(); scheduler.step()`).
    The decision is made with `torch.where`, not a Python branch, so the step stays one graph
    under `torch.compile`. The scaler's state is part of `TrainState`, so resume is bitwise."""

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self):
        if not (self.init_scale > 0 and self.growth_factor > 1 and 0 < self.backoff_factor < 1
                and self.growth_interval >= 1):
            raise ValueError(f"invalid loss scaling {self}: need init_scale > 0, growth_factor > 1, "
                             "0 < backoff_factor < 1, growth_interval >= 1")

    def init(self) -> dict:
        return {"scale": torch.tensor(float(self.init_scale)), "good_steps": torch.tensor(0),
                "skipped_steps": torch.tensor(0), "growth_factor": float(self.growth_factor),
                "backoff_factor": float(self.backoff_factor), "growth_interval": int(self.growth_interval)}


def all_finite(tree) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every tensor leaf is finite."""
    leaves = [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
    if not leaves:
        return torch.tensor(True)
    # Reduced on the leaves' device, one transfer at the end (not one host sync per leaf).
    device = leaves[0].device
    return torch.stack([torch.isfinite(t).all().to(device) for t in leaves]).all().cpu()


def next_loss_scale(loss_scale: dict, finite: torch.Tensor) -> dict:
    """The scaler state after a step whose unscaled gradients were (not) all finite."""
    good = loss_scale["good_steps"] + 1
    grow = good >= loss_scale["growth_interval"]
    scale = loss_scale["scale"]
    return {**loss_scale,
            "scale": torch.where(finite, torch.where(grow, scale * loss_scale["growth_factor"], scale),
                                 scale * loss_scale["backoff_factor"]),
            "good_steps": torch.where(finite & ~grow, good, torch.zeros_like(good)),
            "skipped_steps": loss_scale["skipped_steps"] + (~finite).to(torch.int64)}


def neftune_embed(alpha: float, key: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """NEFTune (Jain et al. 2023): add U(-1, 1) * alpha / sqrt(L * d) noise to input embeddings."""

    def embed_fn(x):
        scale = alpha / (x.shape[1] * x.shape[2]) ** 0.5
        return x + (rng.uniform(key, x.shape, dtype=x.dtype, device=x.device) * 2 - 1) * scale

    return embed_fn


@dataclass(frozen=True)
class Policy:
    """A model with its params bound, as losses see it: `policy(tokens, key=None, **forward_kwargs)
    -> ModelOutput` runs `forward`.

    token_logprobs(hidden [N, D], targets [N]) -> TokenLogprobs: the lm_head and log-softmax on final
    hidden states (`forward(..., compute_logits=False).hidden[mask]`), never the [N, vocab] logits
    when a fused kernel is injected. params: the bound params (heads outside the forward read them:
    reward models' `score.weight`). reference: the reference policy, run without gradient (None on
    the reference itself)."""

    forward: Callable[..., ModelOutput]
    token_logprobs: Callable[[torch.Tensor, torch.Tensor], TokenLogprobs]
    params: dict[str, torch.Tensor]
    reference: "Policy | None" = None

    def __call__(self, tokens, **kwargs) -> ModelOutput:
        return self.forward(tokens, **kwargs)


def make_apply(
    config: ModelConfig,
    frozen: dict[str, torch.Tensor],
    *,
    lora_config: LoraConfig | None = None,
    checkpoint_layers: bool = False,
    attention_fn=sdpa_attention,
    neftune_alpha: float | None = None,
    reference_params: dict[str, torch.Tensor] | None = None,
    token_logprob_fn: TokenLogprobFn = reference_token_logprobs,
    rms_norm_fn: Callable | None = None,
    swiglu_fn: Callable | None = None,
    lora_linear_fn: Callable | None = None,
    linear_fn: Callable | None = None,
) -> Callable[[dict], Policy]:
    """`bind(trainable) -> Policy` whose forward `(tokens, key=None, **forward_kwargs)` runs the model
    with the trainable params over the frozen ones (and the LoRA delta when there is one).
    Its `reference` is the reference policy: `reference_params` (the initial weights: with LoRA the
    same tensors as the frozen ones, so no copy) with no adapter; by default the bound params with
    the adapter disabled.

    `token_logprobs` (on the policy and on its reference, there without gradient) goes through
    `token_logprob_fn`, e.g. `kernels.linear_ce.select_token_logprob_fn(device, dtype)`, which never
    materialises the logits. attention_fn, rms_norm_fn, swiglu_fn, lora_linear_fn, linear_fn: the
    model's hot ops (`kernels/` dispatchers; a quantised base needs its own linear and LoRA linear);
    None keeps the reference of `pure.models.llama`."""
    ops = {"attention_fn": attention_fn}
    ops.update({name: fn for name, fn in (("rms_norm_fn", rms_norm_fn), ("swiglu_fn", swiglu_fn),
                                          ("lora_linear_fn", lora_linear_fn), ("linear_fn", linear_fn))
                if fn is not None})

    def bind(trainable: dict) -> Policy:
        params = {**frozen, **trainable.get("params", {})}
        lora = trainable.get("lora") or None
        ref_params = params if reference_params is None else reference_params

        def apply(tokens, key=None, **kwargs) -> ModelOutput:
            dropout_key = embed_fn = None
            if key is not None:
                dropout_key, noise_key = rng.split(key, 2)
                if neftune_alpha:
                    embed_fn = neftune_embed(neftune_alpha, noise_key)
            return forward(params, tokens, config, lora=lora, lora_config=lora_config, dropout_key=dropout_key,
                           embed_fn=embed_fn, checkpoint_layers=checkpoint_layers, **ops, **kwargs)

        def reference(tokens, **kwargs) -> ModelOutput:
            with torch.no_grad():
                return forward(ref_params, tokens, config, **ops, **kwargs)

        def token_logprobs(hidden: torch.Tensor, targets: torch.Tensor) -> TokenLogprobs:
            return token_logprob_fn(hidden, lm_head_weight(params, config), targets)

        def reference_policy_token_logprobs(hidden: torch.Tensor, targets: torch.Tensor) -> TokenLogprobs:
            with torch.no_grad():
                return token_logprob_fn(hidden, lm_head_weight(ref_params, config), targets)

        return Policy(apply, token_logprobs, params,
                      reference=Policy(reference, reference_policy_token_logprobs, ref_params))

    return bind


def make_accumulator(loss: Loss):
    """`accumulate(trainable, micro_batches, counts, keys, bind, scale=None) -> (grads, loss, metrics)`:
    the gradients of `loss` over the micro-batches (micro-batch i with the batch totals `counts`
    merged in and drawing from `keys[i]`, through `torch.func.grad_and_value` of `bind(trainable)`),
    their loss values and metrics, each summed in micro-batch order. With `scale` (fp16 loss
    scaling) the gradients are those of the scaled loss; the values stay unscaled."""

    def micro_loss(trainable, batch, key, bind, scale):
        value, metrics = loss(bind(trainable), batch, key)
        if scale is None:
            return value, (value, metrics)
        return value * scale, (value, metrics)  # fp16: differentiate the scaled loss

    grad_fn = torch.func.grad_and_value(micro_loss, has_aux=True)

    def accumulate(trainable, micro_batches: Sequence[dict], counts: dict, keys, bind, scale=None):
        grads, total, aux = None, torch.zeros(()), {}
        for mb, key in zip(micro_batches, keys, strict=True):
            (g, (_, (value, metrics))) = grad_fn(trainable, {**mb, **counts}, key, bind, scale)
            grads = g if grads is None else tree_map(torch.add, grads, g)
            total = total + value.detach()
            for name, v in metrics.items():
                aux[name] = aux.get(name, 0) + v.detach()
        return grads, total, aux

    return accumulate


def make_train_step(loss: Loss, optimizer, bind):
    """Build `train_step(state, micro_batches) -> (state, metrics)`.

    Each micro-batch's gradient comes from `torch.func.grad_and_value` over the trainable subtree;
    losses are normalised by totals of the whole accumulated batch (the loss's own `count_fn`:
    target tokens for SFT, pairs for the DPO family, ...), so the summed gradient is the gradient of
    the full-batch mean whatever the micro-batching (1x8 = 2x4 = 8x1). Statistics of the whole
    batch that no gradient flows through (the loss's `batch_stats_fn`: KTO's KL baseline) are
    computed once, before the gradients; like the totals they are merged into every micro-batch.
    Then one optimizer update. Metrics are floats-as-tensors with stable names.
    """
    _check_is_loss(loss, "make_train_step")
    accumulate = make_accumulator(loss)

    def train_step(state: TrainState, micro_batches: Sequence[dict]):
        step_key, next_key = rng.split(state.rng_key, 2)
        counts = loss.totals(bind(state.trainable), micro_batches)
        scaler = state.loss_scale
        # The scale on the trainable params' device, moved once per step.
        scale = scaler["scale"].to(tree_leaves(state.trainable)[0].device) if scaler is not None else None
        keys = [rng.fold_in(step_key, i) for i in range(len(micro_batches))]
        grads, total, aux = accumulate(state.trainable, micro_batches, counts, keys, bind, scale)
        if scaler is not None:
            grads = tree_map(lambda g: g / scale, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable, state.step)
        # The clipping transform already measured the pre-clip norm; measure only when none did.
        grad_norm = grad_norm_from_state(opt_state)
        if grad_norm is None:
            grad_norm = global_norm(grads)
        trainable = apply_updates(state.trainable, updates)
        metrics = {"train/loss": total, "train/grad_norm": grad_norm, **aux}
        if scaler is not None:
            finite = all_finite(grads)
            keep = lambda new, old: torch.where(finite.to(new.device), new, old) if isinstance(new, torch.Tensor) else new
            trainable = tree_map(keep, trainable, state.trainable)
            opt_state = tree_map(keep, opt_state, state.opt_state)
            scaler = next_loss_scale(scaler, finite)
            metrics["train/loss_scale"] = scale
            metrics["train/skipped_step"] = (~finite).to(torch.float32)
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng_key=next_key,
                             loss_scale=scaler), metrics

    return train_step


def make_eval_step(loss: Loss, bind):
    """`eval_step(trainable, micro_batches) -> metrics` without gradients or randomness; the
    micro-batches are one accumulated batch (normalised together, see `make_train_step`)."""
    _check_is_loss(loss, "make_eval_step")

    def eval_step(trainable, micro_batches):
        total, aux = torch.zeros(()), {}
        with torch.no_grad():
            apply = bind(trainable)
            counts = loss.totals(apply, micro_batches)
            for mb in micro_batches:
                value, metrics = loss(apply, {**mb, **counts}, None)
                total = total + value
                for name, v in metrics.items():
                    aux[name] = aux.get(name, 0) + v
        return {"eval/loss": total, **{f"eval/{name}": v for name, v in aux.items()}}

    return eval_step


def _check_is_loss(loss, where: str) -> None:
    if not isinstance(loss, Loss):
        raise TypeError(f"{where} takes a pure.losses.Loss, which carries the totals its values are divided by; "
                        f"got {type(loss).__name__} (wrap a function as Loss(fn, name, count_fn=...))")

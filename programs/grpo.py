"""GRPO and GDPO (`rl: grpo`, `rl: gdpo`): online RL from reward functions, with the native rollout engine.
`python -m programs.grpo --config x.yaml [--key value ...] [--overwrite]`, or `programs.train`.

Reads top to bottom: config -> model -> prompts -> policy (LoRA or full), reference, rollout engine,
reward functions -> objective -> the GRPO step on the shared loop -> export of the policy.

One GRPO step is one optimizer step. Its micro-batches come from a *generation*: the policy samples
`num_generations` completions for each of `prompts_per_generation` prompts, the reward functions
score them, the group advantages are taken, and the batch is shuffled and split into
`steps_per_generation` slices, each trained `num_iterations` times (TRL's buffer). The buffered
generation lives in `TrainState.carry`, so a checkpoint between two of its slices resumes exactly;
the rollout keys are folded from the state's key, so a resumed run samples the same completions.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from programs import common, loop
from programs.config.derived import data_settings, grpo_batching, training_kind
from pure import rng
from pure.train import init_train_state, make_train_step

DESCRIPTION = "GRPO / GDPO (online RL from reward functions) with axolotl's config keys."
KINDS = ("grpo", "gdpo")
# fold_in data of the run's keys (large, so they never meet a split's small counters)
ROLLOUT_STREAM, EVAL_STREAM = 0x524F4C4C, 0x4556414C
TRL_MAX_COMPLETION_LENGTH = 512  # TRL GRPOConfig's default
BUFFER = "buffer/"


def objective(config):
    """The GRPO `Loss` of the config's `trl:` keys (TRL's defaults where unset)."""
    from pure.losses import make_grpo

    trl = config.trl
    return make_grpo(
        loss_type=trl.loss_type or "dapo", epsilon=0.2 if trl.epsilon is None else trl.epsilon,
        epsilon_high=trl.epsilon_high, delta=trl.delta, beta=beta_of(config),
        importance_sampling_level=trl.importance_sampling_level or "token",
        max_completion_length=trl.max_completion_length or TRL_MAX_COMPLETION_LENGTH,
        sapo_temperature_pos=trl.sapo_temperature_pos, sapo_temperature_neg=trl.sapo_temperature_neg,
        temperature=temperature_of(config))


def beta_of(config) -> float:
    """The KL coefficient: `trl.beta` (or `rl_beta`); TRL's default 0 runs no reference model."""
    if config.rl_beta is not None:
        return float(config.rl_beta)
    return float(config.trl.beta) if config.trl.beta is not None else 0.0


def temperature_of(config) -> float:
    return 1.0 if config.trl.temperature is None else float(config.trl.temperature)


def sampling_of(config, tokenizer):
    """The rollout engine's `Sampling` from `trl.*`: stop on EOS and `generation_kwargs.stop_token_ids`."""
    from backends.rollout import Sampling

    trl = config.trl
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stops += [int(t) for t in (trl.generation_kwargs or {}).get("stop_token_ids") or []]
    return Sampling(max_tokens=trl.max_completion_length or TRL_MAX_COMPLETION_LENGTH,
                    temperature=temperature_of(config), top_p=1.0 if trl.top_p is None else trl.top_p,
                    top_k=trl.top_k or 0, min_p=trl.min_p or 0.0,
                    repetition_penalty=1.0 if trl.repetition_penalty is None else trl.repetition_penalty,
                    stop_token_ids=tuple(dict.fromkeys(stops)))


# ---- the data: slots of generations

def epoch_slots(num_prompts: int, batching, seed: int, epoch: int) -> list[dict]:
    """One epoch as micro-batch slots, a pure function of (seed, epoch): the prompts in a seeded
    order, cut into generations of `prompts_per_generation` (an incomplete tail is dropped, as TRL's
    sampler does), each generation giving `steps_per_generation` slices x `num_iterations` passes."""
    order = rng.permutation(rng.fold_in(rng.key(seed), epoch), num_prompts)
    per = batching.prompts_per_generation
    slots = []
    for g in range(num_prompts // per):
        prompts = order[g * per:(g + 1) * per].clone()
        for iteration in range(batching.num_iterations):
            for part in range(batching.steps_per_generation):
                slots.append({"prompts": prompts, "generation": torch.tensor([epoch, g]),
                              "slice": torch.tensor(part), "iteration": torch.tensor(iteration)})
    return slots


def pack_buffer(micro_batches: list[dict], generation: torch.Tensor) -> dict:
    """The buffered generation as flat `carry` entries (`buffer/<slice>/<name>`)."""
    carry = {f"{BUFFER}generation": [int(x) for x in generation]}
    for i, mb in enumerate(micro_batches):
        carry.update({f"{BUFFER}{i}/{k}": v for k, v in mb.items()})
    return carry


def unpack_slice(carry: dict, generation: torch.Tensor, part: int) -> dict:
    want = [int(x) for x in generation]
    if carry.get(f"{BUFFER}generation") != want:
        from backends.checkpoint import CheckpointError

        raise CheckpointError(f"the GRPO step needs slice {part} of generation {want} (epoch, index), but the state "
                              f"carries generation {carry.get(f'{BUFFER}generation')}; the checkpoint is from "
                              "another run setup")
    prefix = f"{BUFFER}{part}/"
    return {k[len(prefix):]: v for k, v in carry.items() if k.startswith(prefix)}


# ---- one generation: sample, score, advantages, the buffer

class Generator:
    """Turns a generation's prompt indices into its trained micro-batches and its metrics."""

    def __init__(self, config, batching, prompts: list[dict], engine, sampling, rewards, tokenizer, bind,
                 pad_id: int):
        self.config, self.batching, self.prompts = config, batching, prompts
        self.engine, self.sampling, self.rewards, self.tokenizer = engine, sampling, rewards, tokenizer
        self.bind, self.pad_id = bind, pad_id
        trl = config.trl
        self.weights = torch.tensor(trl.reward_weights or [1.0] * len(rewards.funcs), dtype=torch.float64)
        self.aggregation = "normalize_then_sum" if config.rl == "gdpo" else \
            (trl.multi_objective_aggregation or "sum_then_normalize")
        self.beta, self.temperature = beta_of(config), temperature_of(config)
        self.rollout_func = None
        if trl.rollout_func:
            from backends.rewards import load_rollout_function

            self.rollout_func = load_rollout_function(trl.rollout_func)

    def sample(self, trainable: dict, indices: list[int], key: torch.Tensor):
        """(prompt row of each completion, Rollouts, texts, rewards per function [N, K], timings)."""
        G = self.batching.num_generations
        chosen = [self.prompts[i] for i in indices]
        repeated = [p for p in chosen for _ in range(G)]
        start = time.perf_counter()
        if self.rollout_func is None:
            out = self.engine.generate(trainable, [p["prompt_ids"] for p in chosen], G, self.sampling, key)
        else:
            from backends.rollout.function import PolicyGenerator, function_rollouts

            model = PolicyGenerator(self.engine, trainable, self.tokenizer, self.sampling, key,
                                    dict(self.config.trl.chat_template_kwargs or {}))
            out = function_rollouts(self.rollout_func, self.config.trl.rollout_func, model,
                                    [p["prompt"] for p in repeated], [p["prompt_ids"] for p in repeated])
        rollout_s = time.perf_counter() - start
        texts = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        scores = self.rewards.score(repeated, texts, out.completion_ids, G)
        timings = {"time/rollout_s": rollout_s, "time/reward_s": time.perf_counter() - start - rollout_s,
                   "rollout/tokens_per_second": sum(map(len, out.completion_ids)) / max(rollout_s, 1e-9)}
        return repeated, out, texts, scores, timings

    def summarize(self, scores: torch.Tensor, completion_ids, finish_reasons):
        """(Advantages, TRL's metrics) of scored completions, whole prompt groups in order."""
        from pure.advantages import group_advantages, reward_metrics

        adv = group_advantages(scores, self.weights, self.batching.num_generations, aggregation=self.aggregation,
                               scale_rewards=self.config.trl.scale_rewards)
        lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float32)
        metrics = reward_metrics(scores, self.weights, self.rewards.names, adv)
        metrics.update({"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                        "completions/max_length": lengths.max().item(),
                        "completions/clipped_ratio": sum(r != "stop" for r in finish_reasons) / len(lengths)})
        return adv, metrics

    def sample_and_score(self, trainable: dict, indices: list[int], key: torch.Tensor):
        """(rows, metrics, Advantages): every completion of the prompts with its reward and advantage."""
        repeated, out, texts, scores, timings = self.sample(trainable, indices, key)
        adv, metrics = self.summarize(scores, out.completion_ids, out.finish_reasons)
        masked = self.config.trl.mask_truncated_completions
        rows = [{"prompt_ids": list(p["prompt_ids"]), "completion_ids": list(c), "advantage": float(a),
                 "masked": bool(masked and reason != "stop")}
                for p, c, a, reason in zip(repeated, out.completion_ids, adv.advantages.tolist(), out.finish_reasons)]
        self.log_completions(repeated, texts, scores, adv.advantages)
        return rows, {**metrics, **timings}, adv

    def __call__(self, trainable: dict, ref_trainable: dict | None, indices: list[int], key: torch.Tensor):
        """(micro-batches of the generation, its metrics, all its advantages zero?, its tokens)."""
        from pure.advantages import all_zero_advantages
        from pure.data.rollout_batch import collate_rollouts
        from pure.losses.grpo import completion_token_logps

        sample_key, shuffle_key = rng.split(key, 2)
        rows, metrics, adv = self.sample_and_score(trainable, indices, sample_key)
        order = rng.permutation(shuffle_key, len(rows)).tolist()  # TRL shuffles the batch before slicing
        size = self.config.micro_batch_size
        micro = []
        for i in range(0, len(rows), size):
            chosen = [rows[j] for j in order[i:i + size]]
            micro.append(collate_rollouts([r["prompt_ids"] for r in chosen], [r["completion_ids"] for r in chosen],
                                          [r["advantage"] for r in chosen], self.pad_id, [r["masked"] for r in chosen]))
        total = sum(mb["completion_mask"].sum() for mb in micro)
        start = time.perf_counter()
        policy = self.bind(trainable) if self.batching.stores_old_logps else None
        reference = self.bind(ref_trainable) if self.beta else None
        with torch.no_grad():
            for mb in micro:
                mb["generation_tokens"] = total.clone()
                if policy is not None:
                    mb["old_logps"] = completion_token_logps(policy, mb, temperature=self.temperature)
                if reference is not None:
                    mb["ref_logps"] = completion_token_logps(reference, mb, temperature=self.temperature)
        metrics["time/logps_s"] = time.perf_counter() - start  # old and reference log-probs
        tokens = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
        return micro, metrics, all_zero_advantages(adv.advantages), tokens

    def log_completions(self, prompts, texts, scores, advantages) -> None:
        trl = self.config.trl
        if not trl.log_completions:
            return
        shown = len(texts) if trl.num_completions_to_print is None else trl.num_completions_to_print
        path = Path(self.config.output_dir) / "completions.jsonl"
        with path.open("a") as f:
            for i, text in enumerate(texts):
                record = {"prompt": prompts[i]["prompt"], "completion": text, "advantage": float(advantages[i]),
                          "rewards": {n: (None if v != v else float(v)) for n, v in zip(self.rewards.names, scores[i].tolist())}}
                f.write(json.dumps(record) + "\n")
                if i < shown:
                    print(f"completion {i}: {text[:200]!r} rewards {record['rewards']} advantage {record['advantage']:+.3f}",
                          flush=True)


class Rewards:
    """The reward functions of `trl.reward_funcs` over a row's columns: in this process, or in a pool
    of `trl.reward_num_workers` processes made once for the run (model rewards stay here)."""

    def __init__(self, config, tokenizer):
        from backends.rewards import RewardPool, load_reward_functions

        trl = config.trl
        self.funcs = load_reward_functions(trl.reward_funcs, tokenizer=tokenizer,
                                           chat_template_kwargs=trl.chat_template_kwargs)
        self.names = [f.name for f in self.funcs]
        functions = [f for f in self.funcs if f.kind == "function"]
        self.pool = RewardPool(functions, trl.reward_num_workers) if trl.reward_num_workers > 1 and functions else None

    def score(self, prompt_rows: list[dict], texts: list[str], completion_ids, num_generations: int) -> torch.Tensor:
        from backends.rewards import score_completions, shape_completions

        prompts = [r["prompt"] for r in prompt_rows]
        columns = {k: [r[k] for r in prompt_rows] for k in prompt_rows[0]}  # score_completions drops prompt(_ids)
        return score_completions(self.funcs, prompts=prompts, completions=shape_completions(prompts, texts),
                                 completion_ids=[list(c) for c in completion_ids], columns=columns,
                                 num_generations=num_generations, pool=self.pool)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


# ---- the step

def make_grpo_step(loss, optimizer, bind, generator: Generator, batching, reference_of, sync):
    """`step(state, slots) -> (state, metrics)`: generate where a slot starts a generation (with the
    state's policy and a key folded from its key), train one optimizer step on the slots' slices,
    then sync the reference when due. `skip_zero_advantage_batches` skips the update (the step and
    its key still advance) when every advantage of the step is zero."""
    inner = make_train_step(loss, optimizer, bind)
    skip_zero = generator.config.trl.skip_zero_advantage_batches

    def step(state, slots):
        carry = dict(state.carry)
        micro, metrics, zero, tokens = [], {}, True, 0
        for i, slot in enumerate(slots):
            if int(slot["slice"]) == 0 and int(slot["iteration"]) == 0:
                key = rng.fold_in(rng.fold_in(state.rng_key, ROLLOUT_STREAM), i)
                batches, metrics, all_zero, gen_tokens = generator(
                    state.trainable, reference_of(carry), slot["prompts"].tolist(), key)
                carry = {k: v for k, v in carry.items() if not k.startswith(BUFFER)}
                carry.update(pack_buffer(batches, slot["generation"]))
                carry[f"{BUFFER}all_zero"] = all_zero
                tokens += gen_tokens
            micro.append(unpack_slice(carry, slot["generation"], int(slot["slice"])))
            zero = zero and carry[f"{BUFFER}all_zero"]
        skipped = int(carry.get("skipped_zero_adv_batches", 0))
        start = time.perf_counter()
        if skip_zero and zero:
            skipped += 1
            new_state = state.replace(step=state.step + 1, rng_key=rng.split(state.rng_key, 2)[1])
            step_metrics = {"train/loss": torch.zeros(()), "train/grad_norm": torch.zeros(())}
        else:
            new_state, step_metrics = inner(state, micro)
        step_metrics["time/train_s"] = time.perf_counter() - start
        carry["skipped_zero_adv_batches"] = skipped
        carry["num_tokens"] = int(carry.get("num_tokens", 0)) + tokens
        carry = sync(new_state, carry)
        step_metrics.update(metrics)
        step_metrics.update({"num_tokens": float(carry["num_tokens"]), "step_tokens": tokens,
                             "skipped_zero_adv_batches": float(skipped)})
        return new_state.replace(carry=carry), step_metrics

    return step


def make_reference(config, trainable: dict, lora_config):
    """(reference_of(carry) -> trainable-shaped params of the reference policy, sync(state, carry) -> carry).

    The reference is the initial policy: the adapter switched off for a new LoRA (the base, and the
    initial `lora_modules_to_save` copies), the initial adapter when training on from
    `lora_model_dir`, the initial weights for a full fine-tune (the loaded tensors themselves:
    updates are functional, nothing is copied). `sync_ref_model` (full fine-tunes) mixes it
    towards the policy every `ref_model_sync_steps` steps, pi_ref <- alpha pi + (1 - alpha) pi_ref
    (`ref_model_mixup_alpha`); then the reference weights are state and travel in `carry`."""
    trl = config.trl
    initial = {"params": dict(trainable.get("params", {})),
               "lora": dict(trainable["lora"]) if lora_config is not None and config.lora_model_dir else {}}
    if not trl.sync_ref_model:  # (with an adapter it is refused at validation)
        return (lambda carry: initial), (lambda state, carry: carry)
    alpha, every = trl.ref_model_mixup_alpha, trl.ref_model_sync_steps

    def reference_of(carry):
        names = initial["params"]
        return {"params": {n: carry.get(f"ref/{n}", t) for n, t in names.items()}}

    def sync(state, carry):
        if state.step % every:
            return carry
        ref = reference_of(carry)["params"]
        return {**carry, **{f"ref/{n}": alpha * t.detach() + (1 - alpha) * ref[n]
                            for n, t in state.trainable["params"].items()}}

    return reference_of, sync


# ---- eval: the mean reward on held-out prompts

def make_eval(generator: Generator, config):
    """`eval_step(trainable, batches)`: completions for the held-out prompts from a fixed key (the same
    at every eval, so evals compare policies, not luck), their rewards under TRL's metric names."""
    key = rng.fold_in(rng.key(config.seed), EVAL_STREAM)

    def eval_step(trainable, batches):
        scores, completions, reasons = [], [], []
        for i, batch in enumerate(batches):
            with torch.no_grad():
                _, out, _, batch_scores, _ = generator.sample(trainable, batch["prompts"].tolist(), rng.fold_in(key, i))
            scores.append(batch_scores)
            completions += out.completion_ids
            reasons += out.finish_reasons
        _, metrics = generator.summarize(torch.cat(scores), completions, reasons)
        return {f"eval/{name}": value for name, value in metrics.items()}

    return eval_step


def run(config, overwrite: bool = False, stop_after_step: int | None = None) -> dict:
    from backends.prompt_data import load_prompt_rows, split_prompt_rows, tokenize_prompts
    from backends.rollout.native import NativeEngine

    kind = training_kind(config)
    if kind not in KINDS:
        from programs.config import ConfigError

        raise ConfigError(f"programs.grpo trains rl: grpo / gdpo; this config has "
                          f"{'rl: ' + kind if kind != 'sft' else 'no rl:'} (use python -m programs.train)")
    batching = grpo_batching(config)
    out, resume_from = loop.start(config, overwrite)

    # ---- model and prompts
    params, model_config, tokenizer = common.load_model(config)
    pad_id = common.pad_id(tokenizer)
    trl = config.trl

    def prompt_rows(entries) -> list[dict]:
        rows = load_prompt_rows([e.to_dict() for e in entries], config=config.to_dict(), tokenizer=tokenizer,
                                settings=data_settings(config))
        # sequence_len bounds the prompt: a longer one is an error naming its row, never cut silently
        return tokenize_prompts(rows, tokenizer, chat_template_kwargs=trl.chat_template_kwargs,
                                max_prompt_length=config.sequence_len)

    rows = prompt_rows(config.datasets)
    eval_rows = prompt_rows(config.test_datasets) if config.test_datasets else []
    if config.val_set_size:
        rows, eval_rows = split_prompt_rows(rows, config.val_set_size, common.data_seed_of(config))
    if len(rows) < batching.prompts_per_generation:
        raise ValueError(f"the training data has {len(rows)} prompts, fewer than one generation needs "
                         f"({batching.generation_batch_size} completions / num_generations "
                         f"{batching.num_generations} = {batching.prompts_per_generation} prompts)")

    # ---- policy, reference, rollouts, rewards, objective
    init_key, lora_key = rng.split(rng.key(config.seed), 2)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    bind = common.make_bind(config, model_config, frozen, lora_config)
    reference_of, sync = make_reference(config, trainable, lora_config)
    engine = NativeEngine(model_config, frozen, lora_config=lora_config, ops=common.quantized_ops(frozen),
                          pad_token_id=pad_id)
    rewards = Rewards(config, tokenizer)
    generator = Generator(config, batching, rows + eval_rows, engine, sampling_of(config, tokenizer), rewards,
                          tokenizer, bind, pad_id)
    loss = objective(config)
    seed = common.data_seed_of(config)

    def epoch_batches(epoch: int) -> list[dict]:
        return epoch_slots(len(rows), batching, seed, epoch)

    total = common.total_steps(config, common.steps_per_epoch(len(epoch_batches(0)),
                                                              config.gradient_accumulation_steps))
    optimizer, schedule = common.build_optimizer_from_config(config, total)
    per_eval = max(1, config.eval_batch_size // batching.num_generations)
    held_out = list(range(len(rows), len(rows) + len(eval_rows)))
    eval_batches = [{"prompts": torch.tensor(held_out[i:i + per_eval])} for i in range(0, len(held_out), per_eval)]
    print(f"GRPO: {batching.prompts_per_generation} prompts x {batching.num_generations} completions per "
          f"generation, {batching.steps_per_generation} slices x {batching.num_iterations} iteration(s), "
          f"loss_type {trl.loss_type or 'dapo'}, beta {beta_of(config):g}, rewards {', '.join(rewards.names)}"
          + (", aggregation normalize_then_sum (GDPO)" if generator.aggregation == "normalize_then_sum" else ""),
          flush=True)

    try:
        return loop.fit(config, loop.Run(
            state=init_train_state(trainable, optimizer, init_key),
            train_step=make_grpo_step(loss, optimizer, bind, generator, batching, reference_of, sync),
            epoch_batches=epoch_batches,
            schedule=schedule,
            export=lambda state: common.export_policy(config, state, frozen, model_config, tokenizer, lora_config),
            eval_step=make_eval(generator, config) if eval_rows else None,
            eval_batches=eval_batches,
            num_examples=(len(rows), len(eval_rows)),
            summary=lambda before, after: summary(len(eval_rows), before, after),
        ), resume_from=resume_from, stop_after_step=stop_after_step)
    finally:
        rewards.close()


def summary(rows: int, before: dict, after: dict) -> str:
    parts = [f"mean reward {before['eval/reward']:.3f} -> {after['eval/reward']:.3f}"]
    parts += [f"{k[len('eval/'):]} {before[k]:.3f} -> {after[k]:.3f}" for k in sorted(after)
              if k.startswith("eval/rewards/") and k.endswith("/mean") and k in before]
    return f"held-out ({rows} prompts): " + ", ".join(parts)


def main(argv=None) -> int:
    return loop.main_for(run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())

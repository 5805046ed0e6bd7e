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

from programs import common, launch, loop
from programs.config.derived import data_settings, grpo_batching, grpo_beta, stale_rollouts, training_kind
from pure import rng
from pure.train import init_train_state

DESCRIPTION = "GRPO / GDPO (online RL from reward functions) with axolotl's config keys."
KINDS = ("grpo", "gdpo")
# fold_in data of the run's keys (large, so they never meet a split's small counters)
ROLLOUT_STREAM, EVAL_STREAM, REPLAY_STREAM = 0x524F4C4C, 0x4556414C, 0x5245504C
TRL_MAX_COMPLETION_LENGTH = 512  # TRL GRPOConfig's default
BUFFER = "buffer/"
SERVED, PENDING = "served/", "pending/"


def objective(config):
    """The GRPO `Loss` of the config's `trl:` keys (TRL's defaults where unset)."""
    from pure.losses import make_grpo

    trl = config.trl
    return make_grpo(
        loss_type=trl.loss_type or "dapo", epsilon=0.2 if trl.epsilon is None else trl.epsilon,
        epsilon_high=trl.epsilon_high, delta=trl.delta, beta=grpo_beta(config),
        importance_sampling_level=trl.importance_sampling_level or "token",
        max_completion_length=trl.max_completion_length or TRL_MAX_COMPLETION_LENGTH,
        sapo_temperature_pos=trl.sapo_temperature_pos, sapo_temperature_neg=trl.sapo_temperature_neg,
        temperature=temperature_of(config), off_policy_mask_threshold=trl.off_policy_mask_threshold,
        use_bias_correction_kl=bool(trl.use_bias_correction_kl))


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

def generation_prompts(num_prompts: int, batching, seed: int, epoch: int, index: int) -> torch.Tensor:
    """The prompt indices of generation `index` of `epoch`: the prompts in a seeded order, cut into
    generations of `prompts_per_generation`, a pure function of (seed, epoch, index)."""
    order = rng.permutation(rng.fold_in(rng.key(seed), epoch), num_prompts)
    per = batching.prompts_per_generation
    return order[index * per:(index + 1) * per].clone()


def epoch_slots(num_prompts: int, batching, seed: int, epoch: int) -> list[dict]:
    """One epoch as micro-batch slots, a pure function of (seed, epoch): its generations (an
    incomplete tail of prompts is dropped, as TRL's sampler does), each giving
    `steps_per_generation` slices x `num_iterations` passes."""
    slots = []
    for g in range(num_prompts // batching.prompts_per_generation):
        prompts = generation_prompts(num_prompts, batching, seed, epoch, g)
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


# ---- off-policy settings

def corrections_of(config) -> dict:
    """The IS correction of rollouts sampled by another policy than the trained one (TRL's vLLM
    correction): on by default with vLLM (TRL's default) and with async prefetch (stale rollouts);
    TRL's defaults mode sequence_mask and cap 3.0. `stale`: the sampler may differ from the policy
    the step starts from, so the micro-batches carry its log-probs (OPSM reads them, as TRL's does
    with vLLM; otherwise it reads the old log-probs)."""
    trl = config.trl
    stale = stale_rollouts(config)
    on = stale if trl.vllm_importance_sampling_correction is None else bool(trl.vllm_importance_sampling_correction)
    return {"on": on, "stale": stale, "mode": trl.vllm_importance_sampling_mode or "sequence_mask",
            "cap": 3.0 if trl.vllm_importance_sampling_cap is None else float(trl.vllm_importance_sampling_cap)}


def prefetch_depth_of(config) -> int:
    """Generations the background producer samples ahead (0: in step); validation makes
    `async_prefetch` need `use_data_producer`, as axolotl does."""
    trl = config.trl
    return (trl.prefetch_depth or 1) if trl.use_data_producer and trl.async_prefetch else 0


# ---- one generation: sample and score (the producer), then the trained micro-batches (the step)

class Generator:
    """Turns a generation's prompt indices into scored rollout groups (`produce`, which may run on
    the producer thread) and those into its trained micro-batches and metrics (`consume`)."""

    def __init__(self, config, batching, prompts: list[dict], backend, sampling, rewards, tokenizer, bind,
                 pad_id: int):
        self.config, self.batching, self.prompts = config, batching, prompts
        self.backend, self.sampling, self.rewards, self.tokenizer = backend, sampling, rewards, tokenizer
        self.bind, self.pad_id = bind, pad_id
        trl = config.trl
        self.weights = torch.tensor(trl.reward_weights or [1.0] * len(rewards.funcs), dtype=torch.float64)
        self.aggregation = "normalize_then_sum" if config.rl == "gdpo" else \
            (trl.multi_objective_aggregation or "sum_then_normalize")
        self.beta, self.temperature = grpo_beta(config), temperature_of(config)
        self.corrections = corrections_of(config)
        # TRL computes the old log-probs whenever the vLLM correction is on; the OPSM needs them too
        self.needs_old_logps = batching.stores_old_logps or self.corrections["on"]
        self.streaming = bool(trl.streaming_partial_batch)
        self.min_groups = trl.streaming_min_groups or 1
        self.rollout_func = None
        if trl.rollout_func:
            from backends.rewards import load_rollout_function

            self.rollout_func = load_rollout_function(trl.rollout_func)

    def sample(self, policy: dict, indices: list[int], key: torch.Tensor):
        """(prompt row of each completion, Rollouts, texts, rewards per function [N, K], timings).
        With `streaming_partial_batch`, groups are scored `streaming_min_groups` at a time as their
        completions arrive, while the rest are still being generated (rewards are per completion,
        so the scores are the same as scoring all at once)."""
        from backends.rollout import Rollouts

        G = self.batching.num_generations
        chosen = [self.prompts[i] for i in indices]
        repeated = [p for p in chosen for _ in range(G)]
        start = time.perf_counter()
        reward_s, synced = 0.0, len(self.backend.sync_seconds)
        if self.rollout_func is not None:
            from backends.rollout.function import PolicyGenerator, function_rollouts

            model = PolicyGenerator(self.backend, policy, self.tokenizer, self.sampling, key,
                                    dict(self.config.trl.chat_template_kwargs or {}))
            out = function_rollouts(self.rollout_func, self.config.trl.rollout_func, model,
                                    [p["prompt"] for p in repeated], [p["prompt_ids"] for p in repeated])
            scores = None
        elif not self.streaming:
            out = self.backend.generate(policy, [p["prompt_ids"] for p in chosen], G, self.sampling, key)
            scores = None
        else:
            parts, scores, ready = {}, torch.zeros(len(repeated), len(self.rewards.funcs), dtype=torch.float64), []
            for i, part in self.backend.generate_each(policy, [p["prompt_ids"] for p in chosen], G, self.sampling, key):
                parts[i] = part
                ready.append(i)
                if len(ready) >= self.min_groups or len(parts) == len(chosen):
                    t0 = time.perf_counter()
                    self._score_groups(ready, parts, repeated, scores)
                    reward_s += time.perf_counter() - t0
                    ready = []
            out = Rollouts.concat([parts[i] for i in range(len(chosen))])
        sync_s = sum(self.backend.sync_seconds[synced:])  # the weights sent to a vLLM engine first
        rollout_s = time.perf_counter() - start - reward_s - sync_s
        texts = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        if scores is None:
            t0 = time.perf_counter()
            scores = self.rewards.score(repeated, texts, out.completion_ids, G)
            reward_s = time.perf_counter() - t0
        timings = {"time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/sync_s": sync_s,
                   "rollout/tokens_per_second": sum(map(len, out.completion_ids)) / max(rollout_s, 1e-9)}
        return repeated, out, texts, scores, timings

    def _score_groups(self, groups: list[int], parts: dict, repeated: list[dict], scores: torch.Tensor) -> None:
        G = self.batching.num_generations
        rows = [p for g in groups for p in repeated[g * G:(g + 1) * G]]
        ids = [c for g in groups for c in parts[g].completion_ids]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        chunk = self.rewards.score(rows, texts, ids, G)
        for j, g in enumerate(groups):
            scores[g * G:(g + 1) * G] = chunk[j * G:(j + 1) * G]

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

    def produce(self, policy: dict, indices: list[int], key: torch.Tensor) -> dict:
        """A generation's groups (one per prompt: `pure.replay`'s group dicts) and its metrics: sampled
        under `policy` from the first half of `key`."""
        sample_key, _ = rng.split(key, 2)
        repeated, out, texts, scores, timings = self.sample(policy, indices, sample_key)
        adv, metrics = self.summarize(scores, out.completion_ids, out.finish_reasons)
        self.log_completions(repeated, texts, scores, adv.advantages)
        G = self.batching.num_generations
        advantages, totals = adv.advantages.tolist(), adv.rewards.tolist()
        groups = [{"prompt": int(p), "completion_ids": [list(c) for c in out.completion_ids[g * G:(g + 1) * G]],
                   "rewards": totals[g * G:(g + 1) * G], "advantages": advantages[g * G:(g + 1) * G],
                   "sampling_logps": [list(x) for x in out.logprobs[g * G:(g + 1) * G]],
                   "finish_reasons": list(out.finish_reasons[g * G:(g + 1) * G])}
                  for g, p in enumerate(indices)]
        return {"groups": groups, "metrics": {**metrics, **timings}}

    def consume(self, produced: dict, trainable: dict, ref_trainable: dict | None, key: torch.Tensor,
                carry: dict) -> tuple[list[dict], dict, bool, int, dict]:
        """(micro-batches, metrics, all advantages zero?, tokens, carry): the replay buffer and the
        re-roll queue (in `carry`) applied, the rows shuffled with the second half of `key` and cut
        into micro-batches with their old / reference log-probs and IS ratios, under the policy now."""
        from pure.advantages import all_zero_advantages
        from pure.data.rollout_batch import collate_rollouts
        from pure.losses.grpo import completion_token_logps, importance_sampling_ratio, sampling_metrics

        trl = self.config.trl
        _, shuffle_key = rng.split(key, 2)
        groups, metrics = produced["groups"], dict(produced["metrics"])
        if trl.replay_buffer_size:
            from pure.replay import fill_from_replay, update_replay

            buffer = carry.get("replay/buffer", [])
            groups, replaced = fill_from_replay(groups, buffer, rng.fold_in(shuffle_key, REPLAY_STREAM))
            carry["replay/buffer"] = update_replay(buffer, produced["groups"], trl.replay_buffer_size)
            metrics["replay/replaced_groups"] = float(replaced)
            metrics["replay/buffer_size"] = float(len(carry["replay/buffer"]))
        if trl.reroll_start_fraction < 1.0:
            from pure.replay import defer_prompts

            carry["reroll/queue"] = defer_prompts(carry.get("reroll/queue", []), produced["groups"])
            metrics["reroll/queue_size"] = float(len(carry["reroll/queue"]))
        masked = trl.mask_truncated_completions
        rows = [{"prompt_ids": list(self.prompts[grp["prompt"]]["prompt_ids"]), "completion_ids": c,
                 "advantage": float(a), "sampling_logps": lp, "masked": bool(masked and reason != "stop")}
                for grp in groups for c, a, lp, reason in zip(grp["completion_ids"], grp["advantages"],
                                                               grp["sampling_logps"], grp["finish_reasons"])]
        order = rng.permutation(shuffle_key, len(rows)).tolist()  # TRL shuffles the batch before slicing
        size = self.config.micro_batch_size
        micro = []
        for i in range(0, len(rows), size):
            chosen = [rows[j] for j in order[i:i + size]]
            micro.append(collate_rollouts([r["prompt_ids"] for r in chosen], [r["completion_ids"] for r in chosen],
                                          [r["advantage"] for r in chosen], self.pad_id, [r["masked"] for r in chosen],
                                          sampling_logps=[r["sampling_logps"] for r in chosen]
                                          if self.corrections["stale"] else None))
        total = sum(mb["completion_mask"].sum() for mb in micro)
        start = time.perf_counter()
        policy = self.bind(trainable) if self.needs_old_logps else None
        reference = self.bind(ref_trainable) if self.beta else None
        with torch.no_grad():
            for mb in micro:
                mb["generation_tokens"] = total.clone()
                if policy is not None:
                    mb["old_logps"] = completion_token_logps(policy, mb, temperature=self.temperature)
                if reference is not None:
                    mb["ref_logps"] = completion_token_logps(reference, mb, temperature=self.temperature)
                if self.corrections["on"]:
                    mb["is_ratio"] = importance_sampling_ratio(mb["old_logps"], mb["sampling_logps"],
                                                               mb["completion_mask"], self.corrections["mode"],
                                                               cap_max=self.corrections["cap"])
        metrics["time/logps_s"] = time.perf_counter() - start  # old and reference log-probs
        if self.corrections["on"]:
            metrics.update(sampling_metrics(micro, self.corrections["mode"]))
        tokens = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
        advantages = torch.tensor([r["advantage"] for r in rows])
        return micro, metrics, all_zero_advantages(advantages), tokens, carry

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

def without(carry: dict, prefix: str) -> dict:
    """`carry` less its entries under `prefix`."""
    return {k: v for k, v in carry.items() if not k.startswith(prefix)}


def holds(carry: dict, prefix: str) -> bool:
    """Whether `carry` has an entry under `prefix`."""
    return any(k.startswith(prefix) for k in carry)


def stash(carry: dict, prefix: str, tree: dict) -> dict:
    """`carry` with the leaves of `tree` under `prefix` + their paths (replacing what was there)."""
    from pure.tree import leaves_with_paths

    return {**without(carry, prefix), **{prefix + path: leaf for path, leaf in leaves_with_paths(tree)}}


def unstash(carry: dict, prefix: str, like: dict) -> dict:
    """The tree shaped like `like` whose leaves `stash` put under `prefix`."""
    from pure.tree import leaves_with_paths, replace_leaves

    return replace_leaves(like, [carry[prefix + path] for path, _ in leaves_with_paths(like)])


def pending_name(generation: tuple[int, int]) -> str:
    """The carry prefix of the queued job of generation (epoch, index)."""
    return f"{PENDING}{generation[0]}.{generation[1]}/"


class RolloutSchedule:
    """Which policy and key each generation is sampled with, and when: the producer's jobs.

    Synchronous (prefetch_depth 0): a generation is sampled when the step that trains on it starts,
    under the policy of that moment (with `vllm_sync_interval` N > 1, under the policy of the last
    step that was a multiple of N: the one the server holds, kept in `carry` under `served/`).
    Async (`async_prefetch`, depth k): when a step starts generation j it also queues generations
    j+1 .. j+k under the current policy, so the producer samples them while this step and the next
    train: generation j+d is d steps stale. A queued job (its policy, prompts and key) lives in
    `carry` under `pending/` until it is trained on, so a checkpoint taken while it is in flight
    resumes by re-running it: the same rollouts wherever the engine is reproducible (native; vLLM
    with its per-request seeds)."""

    def __init__(self, generator: Generator, producer, generation_after, prompts_of, total_steps: int,
                 layout: launch.Layout = launch.ONE_PROCESS):
        self.generator, self.producer, self.layout = generator, producer, layout
        self.generation_after, self.prompts_of, self.total_steps = generation_after, prompts_of, total_steps
        trl = generator.config.trl
        self.sync_every = trl.vllm_sync_interval or 1
        self.depth = producer.depth

    def policy(self, state, carry: dict) -> tuple[dict, dict]:
        """(the policy rollouts are sampled under now, carry): `vllm_sync_interval` keeps the last synced one."""
        if self.sync_every == 1:
            return state.trainable, carry
        if state.step % self.sync_every == 0 or not holds(carry, SERVED):
            return state.trainable, stash(carry, SERVED, state.trainable)
        return unstash(carry, SERVED, state.trainable), carry

    def prompts(self, state, carry: dict, generation: tuple[int, int], prompts: list[int]) -> tuple[list[int], dict]:
        """Deferred re-rolling: once past `reroll_start_fraction` of training, up to `reroll_max_groups`
        prompts of a new generation are replaced by queued zero-signal ones."""
        trl = self.generator.config.trl
        if trl.reroll_start_fraction >= 1.0:
            return prompts, carry
        from pure.replay import reroll_active, reroll_prompts

        active = reroll_active(state.step, self.total_steps, trl.reroll_start_fraction)
        prompts, queue = reroll_prompts(list(prompts), list(carry.get("reroll/queue", [])), trl.reroll_max_groups,
                                        active)
        return prompts, {**carry, "reroll/queue": queue}

    def _queue(self, state, carry: dict, generation: tuple[int, int], key: torch.Tensor) -> dict:
        """Put a job for `generation` in carry (policy snapshot, prompts, key)."""
        name = pending_name(generation)
        if holds(carry, name):
            return carry
        policy, carry = self.policy(state, carry)
        prompts, carry = self.prompts(state, carry, generation, self.prompts_of(*generation))
        return stash({**carry, name + "key": key, name + "prompts": list(prompts)}, name + "policy/", policy)

    def _job(self, state, carry: dict, generation: tuple[int, int]):
        """(policy, prompts, key) of the job `_queue` put in carry for `generation`."""
        name = pending_name(generation)
        return unstash(carry, name + "policy/", state.trainable), carry[name + "prompts"], carry[name + "key"]

    def take(self, state, carry: dict, generation: tuple[int, int], prompts: list[int], slot_key: torch.Tensor):
        """(produced generation, carry) for the generation this step starts."""
        if self.depth == 0:
            policy, carry = self.policy(state, carry)
            prompts, carry = self.prompts(state, carry, generation, prompts)
            produced = self.layout.from_main(self.producer.call, self.producer.work, policy, prompts, slot_key)
            return produced, carry, slot_key
        base = rng.fold_in(state.rng_key, ROLLOUT_STREAM)
        ahead, wanted = generation, [generation]
        for _ in range(self.depth):
            ahead = self.generation_after(ahead)
            wanted.append(ahead)
        for g in wanted:  # this one first (start of a run), then the ones to sample while we train
            carry = self._queue(state, carry, g, rng.fold_in(rng.fold_in(base, g[0]), g[1]))
        live = [pending_name(g) for g in wanted]  # jobs queued for generations no longer wanted are dropped
        carry = {k: v for k, v in carry.items() if not k.startswith(PENDING) or any(k.startswith(n) for n in live)}
        for g in wanted:  # a resumed run re-submits what the checkpoint had in flight
            self.producer.submit(g, *self._job(state, carry, g))
        _, _, key = self._job(state, carry, generation)
        produced = self.layout.from_main(self.producer.result, generation)
        return produced, without(carry, pending_name(generation)), key


def nothing(*args):
    """A job that does nothing: a rank other than 0 under torchrun samples nothing itself."""
    return None


def make_grpo_step(loss, optimizer, bind, generator: Generator, rollouts: RolloutSchedule, reference_of, sync,
                   layout: launch.Layout = launch.ONE_PROCESS):
    """`step(state, slots) -> (state, metrics)`: where a slot starts a generation, take it from the
    rollouts (sampled now, or prefetched), make its micro-batches under the state's policy; train one
    optimizer step on the slots' slices, then sync the reference when due.
    `skip_zero_advantage_batches` skips the update (the step and its key still advance) when every
    advantage of the step is zero.

    Under torchrun (`layout`) rank 0 samples and scores each generation with the gathered policy and
    the others receive it; every rank builds the slices' micro-batches from it (old and reference
    log-probs under the gathered policy: the same batches, checked each step), and the sharded step
    trains each rank on its rows of them."""
    inner, _ = layout.steps(loss, optimizer, bind)
    skip_zero = generator.config.trl.skip_zero_advantage_batches

    def step(state, slots):
        sharded, state = state, state.replace(trainable=layout.whole(state.trainable))
        carry = dict(state.carry)
        micro, metrics, zero, tokens = [], {}, True, 0
        for i, slot in enumerate(slots):
            if int(slot["slice"]) == 0 and int(slot["iteration"]) == 0:
                key = rng.fold_in(rng.fold_in(state.rng_key, ROLLOUT_STREAM), i)
                generation = tuple(int(x) for x in slot["generation"])
                produced, carry, key = rollouts.take(state, carry, generation, slot["prompts"].tolist(), key)
                batches, metrics, all_zero, gen_tokens, carry = generator.consume(
                    produced, state.trainable, reference_of(carry), key, carry)
                carry = without(carry, BUFFER)
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
            layout.check_same(micro, "the ranks built different GRPO batches from the same generations")
            new_state, step_metrics = inner(sharded, micro)
        step_metrics["time/train_s"] = time.perf_counter() - start
        carry["skipped_zero_adv_batches"] = skipped
        carry["num_tokens"] = int(carry.get("num_tokens", 0)) + tokens
        carry = sync(new_state.replace(trainable=layout.whole(new_state.trainable)), carry)
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

def make_eval(generator: Generator, producer, config, layout: launch.Layout = launch.ONE_PROCESS):
    """`eval_step(trainable, batches)`: completions for the held-out prompts from a fixed key (the same
    at every eval, so evals compare policies, not luck), their rewards under TRL's metric names.
    Under torchrun rank 0 samples and scores them, and the others receive them."""
    key = rng.fold_in(rng.key(config.seed), EVAL_STREAM)
    sample = generator.sample if layout.is_main else nothing

    def eval_step(trainable, batches):
        scores, completions, reasons = [], [], []
        for i, batch in enumerate(batches):
            with torch.no_grad():
                _, out, _, batch_scores, _ = layout.from_main(producer.call, sample, trainable,
                                                              batch["prompts"].tolist(), rng.fold_in(key, i))
            scores.append(batch_scores)
            completions += out.completion_ids
            reasons += out.finish_reasons
        _, metrics = generator.summarize(torch.cat(scores), completions, reasons)
        return {f"eval/{name}": value for name, value in metrics.items()}

    return eval_step


def run(config, overwrite: bool = False, stop_after_step: int | None = None) -> dict:
    from backends.prompt_data import load_prompt_rows, split_prompt_rows, tokenize_prompts
    from programs.grpo_backend import Producer, make_backend

    kind = training_kind(config)
    if kind not in KINDS:
        from programs.config import ConfigError

        raise ConfigError(f"programs.grpo trains rl: grpo / gdpo; this config has "
                          f"{'rl: ' + kind if kind != 'sft' else 'no rl:'} (use python -m programs.train)")
    batching = grpo_batching(config)
    layout = launch.layout_of(config)
    out, resume_from = loop.start(config, overwrite, layout)

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
    rewards = Rewards(config, tokenizer)
    backend = None
    try:
        backend = make_backend(config, model_config, frozen, lora_config, tokenizer, pad_id)
        generator = Generator(config, batching, rows + eval_rows, backend, sampling_of(config, tokenizer), rewards,
                              tokenizer, bind, pad_id)
    except BaseException:
        rewards.close()
        raise
    loss = objective(config)
    seed = common.data_seed_of(config)

    def epoch_batches(epoch: int) -> list[dict]:
        return epoch_slots(len(rows), batching, seed, epoch)

    def generation_after(generation: tuple[int, int]) -> tuple[int, int]:
        epoch, index = generation
        return (epoch, index + 1) if index + 1 < len(rows) // batching.prompts_per_generation else (epoch + 1, 0)

    total = common.total_steps(config, common.steps_per_epoch(len(epoch_batches(0)),
                                                              config.gradient_accumulation_steps))
    optimizer, schedule = common.build_optimizer_from_config(config, total)
    # Under torchrun rank 0 samples and scores each generation (the only rank that talks to vLLM or runs the
    # reward functions); the others receive it (`Layout.from_main`) and build the same batches from it.
    producer = Producer(generator.produce if layout.is_main else nothing, prefetch_depth_of(config))
    rollouts = RolloutSchedule(generator, producer, generation_after,
                               lambda epoch, index: generation_prompts(len(rows), batching, seed, epoch, index).tolist(),
                               total, layout)
    per_eval = max(1, config.eval_batch_size // batching.num_generations)
    held_out = list(range(len(rows), len(rows) + len(eval_rows)))
    eval_batches = [{"prompts": torch.tensor(held_out[i:i + per_eval])} for i in range(0, len(held_out), per_eval)]
    print(f"GRPO: {batching.prompts_per_generation} prompts x {batching.num_generations} completions per "
          f"generation, {batching.steps_per_generation} slices x {batching.num_iterations} iteration(s), "
          f"loss_type {trl.loss_type or 'dapo'}, beta {grpo_beta(config):g}, rewards {', '.join(rewards.names)}"
          + (", aggregation normalize_then_sum (GDPO)" if generator.aggregation == "normalize_then_sum" else ""),
          flush=True)
    print(describe_rollouts(config, backend, producer.depth, generator.corrections), flush=True)

    try:
        return loop.fit(config, loop.Run(
            state=init_train_state(trainable, optimizer, init_key),
            train_step=make_grpo_step(loss, optimizer, bind, generator, rollouts, reference_of, sync, layout),
            epoch_batches=epoch_batches,
            schedule=schedule,
            export=lambda state: common.export_policy(config, state, frozen, model_config, tokenizer, lora_config),
            eval_step=layout.whole_params(make_eval(generator, producer, config, layout)) if eval_rows else None,
            eval_batches=eval_batches,
            num_examples=(len(rows), len(eval_rows)),
            summary=lambda before, after: summary(len(eval_rows), before, after),
            layout=layout,
        ), resume_from=resume_from, stop_after_step=stop_after_step)
    finally:
        producer.close()
        if backend.sync_seconds:
            seconds = sorted(backend.sync_seconds)
            print(f"weight sync to {backend.kind} vLLM: {len(seconds)} syncs, median {seconds[len(seconds) // 2]:.2f} s",
                  flush=True)
        backend.close()
        rewards.close()


def describe_rollouts(config, backend, depth: int, corrections: dict) -> str:
    """One line: which engine samples, how the policy reaches it, how stale rollouts are corrected."""
    trl = config.trl
    parts = {"native": "rollouts: native engine",
             "server": f"rollouts: vLLM server at {backend.where}",
             "colocate": "rollouts: in-process vLLM (colocate)"}[backend.kind]
    if backend.kind != "native":
        parts += (", LoRA sync" if backend.lora_sync else ", full-weight sync") + \
            f" every {trl.vllm_sync_interval or 1} step(s)"
    if depth:
        parts += f", async prefetch depth {depth}"
    if corrections["on"]:
        parts += f", IS correction {corrections['mode']} cap {corrections['cap']:g}"
    if trl.off_policy_mask_threshold is not None:
        parts += f", off-policy mask {trl.off_policy_mask_threshold:g}"
    return parts


def summary(rows: int, before: dict, after: dict) -> str:
    parts = [f"mean reward {before['eval/reward']:.3f} -> {after['eval/reward']:.3f}"]
    parts += [f"{k[len('eval/'):]} {before[k]:.3f} -> {after[k]:.3f}" for k in sorted(after)
              if k.startswith("eval/rewards/") and k.endswith("/mean") and k in before]
    return f"held-out ({rows} prompts): " + ", ".join(parts)


def main(argv=None) -> int:
    return loop.main_for(run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The training loop every program shares (SFT, DPO family, KTO, ORPO, reward models, GRPO).

A program builds its pieces (model, batches, loss, step) and hands them to `fit`, which owns what
is the same for all of them: resume, the step loop over the data cursor, logging, eval, scheduled
and signal-triggered checkpoints, the NaN guard, the final eval and export.

    out, resume_from = start(config, overwrite)
    ... the program builds `Run` ...
    return fit(config, run, resume_from=resume_from, stop_after_step=None)
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from backends import checkpoint as ckpt
from backends.metrics import MetricsLogger, RecordsOnly
from kernels.measure import max_rss_mb
from programs import common
from programs.launch import ONE_PROCESS, Layout
from pure.optim import schedule_free_eval_params
from pure.train import TrainState
from pure.tree import tree_leaves


class StepAborted(RuntimeError):
    """A step that could not run for a reason outside the training (GRPO's rollout server stopped
    answering): `fit` saves the state from before the step as a resumable checkpoint and re-raises
    with where it is, so the program exits non-zero and a rerun resumes from there."""


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves a resumable checkpoint and exits cleanly."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def close(self) -> None:
        """Give the signals back to the handlers that were there before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """What a program hands to `fit`.

    epoch_batches(epoch) -> that epoch's micro-batches, a pure function of the epoch (so resume
    rebuilds the same ones); each micro-batch is a dict of tensors plus `num_tokens` (real tokens),
    unless the train step reports its own `step_tokens` metric (GRPO's rollouts).
    stream(data_cursor) -> an endless iterator of (cursor after the step, micro-batches), instead
    of `epoch_batches`, for streamed datasets whose epoch length is unknown (needs `max_steps`).
    eval_step(trainable, micro_batches) -> metrics named `eval/...`. export(state) -> the folder.
    summary(before, after) -> a line comparing the first and last eval records (or None).
    layout: the processes it runs in (`programs.launch`): `state` is placed, saved, loaded and
    exported through it; `train_step` and `eval_step` come from its `steps`.
    """

    state: TrainState
    train_step: Callable
    epoch_batches: Callable[[int], list[dict]] | None
    schedule: Callable[[int], float]
    export: Callable[[TrainState], Path]
    eval_step: Callable | None = None
    eval_batches: list[dict] = field(default_factory=list)
    num_examples: tuple[int, int] = (0, 0)
    summary: Callable[[dict, dict], str] | None = None
    quiet_metrics: tuple[str, ...] = ()
    stream: Callable[[dict], Iterator[tuple[dict, list[dict]]]] | None = None
    layout: Layout = ONE_PROCESS


def start(config, overwrite: bool, layout: Layout = ONE_PROCESS) -> tuple[Path, Path | None]:
    """Check output_dir against the config (or resume), write the resolved config (rank 0); return
    (output_dir, checkpoint to resume from or None)."""
    from programs.config import write_resolved_config

    out = Path(config.output_dir)
    resume_from = find_resume_checkpoint(config)
    check_output_dir(config, overwrite, resume_from is not None)
    with layout.main_first():  # every rank has checked the folder before rank 0 writes into it
        if layout.is_main:
            write_resolved_config(config, out)
    return out, resume_from


def check_output_dir(config, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into an output_dir written by a different config, unless resuming or --overwrite."""
    from programs.config import ConfigError

    previous = Path(config.output_dir) / "config.yaml"
    if not previous.is_file() or overwrite or resuming:
        return
    import yaml

    old = yaml.safe_load(previous.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(config.to_dict())) or {}
    ignored = {"resume_from_checkpoint", "auto_resume_from_checkpoints", "max_steps", "num_epochs"}
    changed = sorted(k for k in set(old) | set(new) if k not in ignored and old.get(k) != new.get(k))
    if changed:
        raise ConfigError(
            f"output_dir {config.output_dir} holds a run with a different config (keys {changed[:6]} differ); "
            "pass --overwrite to replace it, or choose another output_dir"
        )


def find_resume_checkpoint(config) -> Path | None:
    if config.resume_from_checkpoint:
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"resume_from_checkpoint: {path} does not exist")
        return path
    if config.auto_resume_from_checkpoints:
        return ckpt.latest_checkpoint(config.output_dir)
    return None


def every(value, per_epoch: int) -> int | None:
    """`eval_steps` / `save_steps` given as a count or a fraction of an epoch."""
    if value is None:
        return None
    return max(1, round(value * per_epoch)) if isinstance(value, float) and value < 1 else int(value)


def per_epoch_interval(steps, per_epoch_count, per_epoch: int | None, key: str) -> int | None:
    """Steps between evals / saves from `*_steps` (a count or a fraction of an epoch) or `*s_per_epoch`."""
    if per_epoch is None and (per_epoch_count or (isinstance(steps, float) and steps < 1)):
        from programs.config import ConfigError

        raise ConfigError(f"{key}: a streamed dataset has no known epoch length; give {key} intervals in steps")
    if steps is not None:
        return every(steps, per_epoch)
    return max(1, per_epoch // per_epoch_count) if per_epoch_count else None


def epoch_steps(epoch_batches: Callable[[int], list[dict]], cursor: dict, accumulation: int,
                first_epoch: list[dict] | None = None) -> Iterator[tuple[dict, list[dict], float]]:
    """(cursor after the step, its micro-batches, fraction of the epoch done) from `cursor` on; an
    epoch's tail shorter than one accumulated batch is skipped, then the next epoch is built."""
    epoch, index = cursor["epoch"], cursor["batch"]
    batches = first_epoch if epoch == 0 and first_epoch is not None else epoch_batches(epoch)
    while True:
        if index + accumulation > len(batches):
            epoch, index = epoch + 1, 0
            batches = epoch_batches(epoch)
        index += accumulation
        yield {"epoch": epoch, "batch": index}, batches[index - accumulation:index], index / len(batches)


def check_enough_batches(num_micro_batches: int, config) -> None:
    accumulation = config.gradient_accumulation_steps
    if num_micro_batches < accumulation:
        raise ValueError(
            f"the training data makes {num_micro_batches} micro-batch(es) of micro_batch_size "
            f"{config.micro_batch_size}, fewer than one batch of gradient_accumulation_steps {accumulation}; "
            "add data or lower micro_batch_size / gradient_accumulation_steps"
        )


def fit(config, run: Run, *, resume_from: Path | None = None, stop_after_step: int | None = None) -> dict:
    """Train `run.state` with `run.train_step` until the config's step count, then export.

    `stop_after_step` stops like a signal would (checkpoint, clean exit) once that step is done:
    the resume tests use it."""
    out = Path(config.output_dir)
    accumulation = config.gradient_accumulation_steps
    layout = run.layout
    train_step, eval_step, state = wrap_steps(config, run.train_step, run.eval_step, run.state)
    state = layout.place(state)
    if resume_from is not None:
        state = layout.load(resume_from, state)
        print(f"resumed from {resume_from} at step {state.step}", flush=True)
    if run.stream is not None:
        if not config.max_steps:
            from programs.config import ConfigError

            raise ConfigError("streamed datasets have no known epoch length: set max_steps")
        per_epoch, total = None, config.max_steps
        steps = ((cursor, micro, 0.0) for cursor, micro in run.stream(state.data_cursor))
    else:
        first_epoch = run.epoch_batches(0)
        check_enough_batches(len(first_epoch), config)
        per_epoch = common.steps_per_epoch(len(first_epoch), accumulation)
        total = common.total_steps(config, per_epoch)
        steps = epoch_steps(run.epoch_batches, state.data_cursor, accumulation, first_epoch)

    logger = RecordsOnly() if not layout.is_main else MetricsLogger(out, use_tensorboard=bool(config.use_tensorboard),
                           wandb_project=config.wandb_project if config.use_wandb is not False else None,
                           wandb_name=config.wandb_name, wandb_mode=config.wandb_mode,
                           wandb_entity=config.wandb_entity, wandb_run_id=config.wandb_run_id,
                           config_dict=config.to_dict(), resume=resume_from is not None,
                           use_mlflow=config.use_mlflow, mlflow_tracking_uri=config.mlflow_tracking_uri,
                           mlflow_experiment_name=config.mlflow_experiment_name,
                           mlflow_run_name=config.mlflow_run_name)
    if resume_from is not None:
        logger.truncate_after(state.step)
    eval_every, save_every = per_epoch_interval(config.eval_steps, config.evals_per_epoch, per_epoch, "eval"), \
        per_epoch_interval(config.save_steps, config.saves_per_epoch, per_epoch, "save")
    if config.save_strategy == "no":
        save_every = None
    elif config.save_strategy == "epoch":
        save_every = per_epoch_interval(None, 1, per_epoch, "save_strategy: epoch")
    log_every = config.logging_steps or 1
    if config.eval_strategy == "no":
        eval_every = None
    elif config.eval_strategy == "epoch":
        eval_every = per_epoch_interval(None, 1, per_epoch, "eval_strategy: epoch")
    elif config.eval_strategy == "steps" and eval_every is None:
        eval_every = log_every  # transformers: eval_steps defaults to logging_steps
    watchdog = LossWatchdog(config.loss_watchdog_threshold, config.loss_watchdog_patience)
    stop = StopRequested()
    n_params = sum(t.numel() for t in tree_leaves(state.trainable))
    print(f"training {n_params:,} params for {total} steps ({per_epoch or 'streamed, unknown'} per epoch, "
          f"{run.num_examples[0] or 'streamed'} examples, {run.num_examples[1]} eval)", flush=True)
    has_eval = bool(run.eval_batches) and run.eval_step is not None and config.eval_strategy != "no"

    def evaluate() -> dict:  # schedule-free optimizers train y and evaluate x (pure.optim.schedule_free)
        weights = schedule_free_eval_params(state.trainable, state.opt_state)
        return eval_step(weights, [common.tensors_only(b) for b in run.eval_batches])

    def save(reason: str) -> Path:
        path = layout.save(state, out, extra={"reason": reason}, total_limit=config.save_total_limit)
        print(f"saved {path}", flush=True)
        return path

    last_saved = resume_from
    window_tokens, window_start = 0, time.perf_counter()
    run_tokens, run_start, run_first_step = 0, time.perf_counter(), state.step
    if has_eval and state.step == 0:
        logger.log(0, evaluate())
    while state.step < total:
        cursor, micro, epoch_progress = next(steps)
        try:
            new_state, metrics = train_step(state, [common.tensors_only(b) for b in micro])
        except StepAborted as err:
            last_saved = save("aborted")
            logger.close()
            stop.close()
            raise StepAborted(f"step {state.step + 1} aborted: {err}. The state before it is saved in {last_saved}; "
                              f"rerun with --resume_from_checkpoint {last_saved} (or auto_resume_from_checkpoints: "
                              "true) once the cause is fixed") from None
        loss = metrics["train/loss"].item()
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
            stop.close()
            raise FloatingPointError(f"train/loss is {loss} at step {state.step + 1}; {where}")
        state = new_state.replace(data_cursor=cursor)
        # A step that makes its own tokens (GRPO's rollouts) reports how many it trained on.
        step_tokens = int(metrics.pop("step_tokens")) if "step_tokens" in metrics else sum(b["num_tokens"] for b in micro)
        window_tokens += step_tokens
        run_tokens += step_tokens
        if state.step % log_every == 0 or state.step == total:
            elapsed = time.perf_counter() - window_start
            metrics["train/learning_rate"] = run.schedule(state.step - 1)
            if config.include_tkps:
                metrics["train/tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
            metrics["train/epoch"] = cursor["epoch"] + epoch_progress
            metrics["memory/max_rss_mb"] = max_rss_mb()
            logger.log(state.step, {k: v for k, v in metrics.items() if k not in run.quiet_metrics})
            window_tokens, window_start = 0, time.perf_counter()
        if has_eval and eval_every and state.step % eval_every == 0:
            logger.log(state.step, evaluate())
        if (save_every and state.step % save_every == 0) or (config.save_first_step and state.step == 1):
            last_saved = save("scheduled")
        if config.gc_steps and state.step % config.gc_steps == 0:
            collect_garbage()
        if watchdog.exceeded(loss):
            print(f"loss_watchdog: train/loss above {watchdog.threshold} for {watchdog.patience} steps in a row; "
                  f"stopping at step {state.step}", flush=True)
            break
        if stop_after_step is not None and state.step >= stop_after_step:
            stop.signal = "stop_after_step"
        stop.signal = layout.agree(stop.signal)
        if stop.signal:
            last_saved = save(stop.signal)
            print(f"stopped by {stop.signal} at step {state.step}; resume with "
                  f"--resume_from_checkpoint {last_saved}", flush=True)
            logger.close()
            stop.close()
            return {"stopped": True, "step": state.step, "checkpoint": str(last_saved)}

    final = {}
    if config.include_tokens_per_second and state.step > run_first_step:
        logger.log(state.step, {"train/run_tokens_per_second": run_tokens / max(time.perf_counter() - run_start, 1e-9)})
    if has_eval:
        final = logger.records[-1] if (eval_every and state.step % eval_every == 0) else logger.log(state.step, evaluate())
        before = next((r for r in logger.records if r["step"] == 0 and any(k.startswith("eval/") for k in r)), None)
        if before is not None and run.summary is not None:
            print(run.summary(before, final), flush=True)
    if config.save_strategy != "no" and (last_saved is None or last_saved.name != f"checkpoint-{state.step}"):
        save("final")
    if getattr(train_step, "compile_seconds", None):
        print(f"torch_compile: compiled {len(train_step.compile_seconds)} graph(s) in "
              f"{sum(train_step.compile_seconds):.1f} s (cache {train_step.cache_dir})", flush=True)
    exported = layout.export(run.export, state.replace(
        trainable=schedule_free_eval_params(state.trainable, state.opt_state)), last_saved)
    print(f"exported to {exported}", flush=True)
    logger.plot_losses()
    logger.close()
    stop.close()
    return {"stopped": False, "step": state.step, "eval": final, "records": logger.records, "state": state,
            "watchdog": watchdog.tripped}


class LossWatchdog:
    """axolotl's loss watchdog: training stops once the loss has been above `threshold` for
    `patience` steps in a row (a step at or below it resets the count). Off without a threshold."""

    def __init__(self, threshold: float | None, patience: int):
        self.threshold, self.patience = threshold, patience
        self.count, self.tripped = 0, False

    def exceeded(self, loss: float) -> bool:
        if self.threshold is None:
            return False
        self.count = self.count + 1 if loss > self.threshold else 0
        self.tripped = self.count >= self.patience
        return self.tripped


def collect_garbage() -> None:
    """`gc_steps`: Python's collector, and the CUDA caching allocator's unused blocks."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def wrap_steps(config, train_step, eval_step, state):
    """The steps as the config runs them, and the state they start from: under the precision
    plan's autocast (fp16 adds the dynamic loss scaler to the state), and the train step compiled
    with a persistent cache when `torch_compile: true` (`auto` leaves it eager: on CPU a cold
    compile costs minutes, more than the short runs it would speed up)."""
    from backends.precision import autocast_context
    from programs.config.derived import precision_plan
    from pure.train import LossScaling

    device = next(iter(tree_leaves(state.trainable))).device
    plan = precision_plan(config, device)
    if plan.loss_scaling and state.loss_scale is None:
        state = state.replace(loss_scale=LossScaling().init())
    if config.torch_compile is True:
        from backends.compile import cache_dir_for, compile_step

        ignored = {"output_dir", "resume_from_checkpoint", "auto_resume_from_checkpoints", "logging_steps",
                   "eval_steps", "save_steps", "save_total_limit", "num_epochs", "max_steps", "use_tensorboard"}
        keys = {k: v for k, v in config.to_dict().items() if k not in ignored}
        train_step = compile_step(train_step, cache_dir_for(keys, device), backend=config.torch_compile_backend
                                  or "inductor", mode=config.torch_compile_mode)
    if plan.autocast_dtype is None and not plan.tf32:
        return train_step, eval_step, state
    print(f"precision: {plan.reason}", flush=True)

    def autocast_train_step(state, micro_batches):
        with autocast_context(plan, device):
            return train_step(state, micro_batches)

    def autocast_eval_step(trainable, micro_batches):
        with autocast_context(plan, device):
            return eval_step(trainable, micro_batches)

    autocast_train_step.compile_seconds = getattr(train_step, "compile_seconds", None)
    autocast_train_step.cache_dir = getattr(train_step, "cache_dir", None)
    return autocast_train_step, (autocast_eval_step if eval_step is not None else None), state


def main_for(run_fn: Callable, description: str, argv=None) -> int:
    """The `main` of a training program: parse the CLI, run, turn known errors into one line."""
    from backends.checkpoint import CheckpointError
    from backends.export import AdapterError
    from backends.hf import ModelLoadError
    from programs.config import ConfigError, parse_cli
    from pure.data.settings import DataError

    try:
        config, extra = parse_cli(argv, description, program_flags={"--overwrite": False})
        run_fn(config, overwrite="--overwrite" in extra)
    except (ConfigError, DataError, ModelLoadError, CheckpointError, AdapterError, FloatingPointError, ValueError,
            StepAborted) as e:
        common.fail(str(e))
    except RuntimeError as e:
        if not lost_another_process(e):
            raise
        common.fail(f"rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}: lost another "
                    f"process of the run ({str(e).strip().splitlines()[0][:300]}); no checkpoint was left half-written: "
                    "rerun with auto_resume_from_checkpoints: true to go on from the last one")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def lost_another_process(error: RuntimeError) -> bool:
    """Whether `error` is a collective of a torchrun world failing because another rank stopped
    (killed, or failed with its own error): torch's DistError, or gloo's / NCCL's RuntimeError."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        sign in text for sign in ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "NCCL"))

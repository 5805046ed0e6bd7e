"""GRPO's reward functions: what `trl.reward_funcs` names, loaded, called and checked.

    funcs = load_reward_functions(["rewards.accuracy", "runs/rm/model"], tokenizer=tokenizer)
    completions = shape_completions(prompts, texts)
    scores = score_completions(funcs, prompts=prompts, completions=completions, completion_ids=ids,
                               columns=columns, num_generations=G)      # float64 [N, K], NaN = None

Each name is either a dotted `module.fn` importable from the working directory (axolotl's custom
reward functions) or a local folder (or a Hub id in the local cache) holding a
`...ForSequenceClassification` reward model, as `python -m programs.rm` exports one. A function is
called as TRL's GRPOTrainer calls it, `fn(prompts=..., completions=..., completion_ids=..., **columns)`,
where the columns are the dataset's other columns, one value per completion; it returns one number
(or None, "leave this row out") per completion. A model scores `prompt + completion` text: for chat
prompts the chat template applied to the prompt messages followed by the assistant completion, for
plain prompts the two strings joined; it is tokenised with the model folder's own tokenizer, without
special tokens added and padded on the right, and the score head is read at the last non-pad token.

The scores are raw: `reward_weights` and the group normalisation are the caller's. Everything a
reward function can get wrong (raising, the wrong count, a non-number, NaN) is a one-line
`RewardError` naming the function and the row.

`reward_num_workers > 1` (math_verify's `signal.alarm` needs a main thread of its own) runs the
function rewards in a `RewardPool` of spawned processes, sharded by whole prompt groups; model
rewards always run in this process. torch is imported where a model is used, so the workers start
without it.
"""
from __future__ import annotations

import math
import multiprocessing
import numbers
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from backends.prompt_data import is_chat_prompt
from backends.user_code import UserFunctionError, load_user_function

if TYPE_CHECKING:
    import torch

REWARD_KINDS = ("function", "model")
# Columns TRL keeps out of the reward kwargs: the prompt and completion arrive as their own arguments.
RESERVED_COLUMNS = ("prompt", "completion", "completion_ids", "prompt_ids")
_CALL_ARGUMENTS = ("prompts", "completions", "completion_ids")


class RewardError(ValueError):
    """A reward function that cannot be loaded, or that failed or returned something other than one
    number (or None) per completion; the message names the function, the row and what was expected."""


@dataclass(frozen=True)
class RewardFunction:
    """One entry of `reward_funcs`: `name` as metrics show it (`rewards/<name>/mean`), the callable,
    its kind ("function" or "model") and `source`, the name the config gave (a dotted path or folder)."""

    name: str
    fn: Callable
    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"RewardFunction {self.name!r}: kind must be one of {REWARD_KINDS}, got {self.kind!r}")

    @property
    def label(self) -> str:
        """How error messages name it: the config's spelling when known."""
        return self.source or self.name


# ---------------------------------------------------------------------------------------------
# Loading


def _reward_model_folder(name: str) -> Path | None:
    """The local folder a name points at (a path, or an `org/name` Hub id in the local cache), or None."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if "/" in name and not name.startswith((".", "/", "~")):
        from backends.hf import ModelLoadError, resolve_model_path

        try:
            return resolve_model_path(name)
        except ModelLoadError:
            return None
    return None


_EXPECTED = ("a dotted module.fn importable from the working directory, or a local folder holding a "
             "...ForSequenceClassification reward model (config.json + model.safetensors with score.weight)")


def load_reward_functions(names: Sequence[str], *, tokenizer=None, chat_template_kwargs: Mapping | None = None,
                          batch_size: int = 8, device: str = "cpu") -> list[RewardFunction]:
    """The `trl.reward_funcs` entries, in order, loaded.

    tokenizer: used for a reward-model folder that has no tokenizer of its own (TRL would load the
    model's); chat_template_kwargs: passed to the reward model's chat template; batch_size, device:
    how model rewards run their forward.
    """
    loaded = []
    for name in names:
        name = str(name)
        folder = _reward_model_folder(name)
        if folder is not None:
            model = load_sequence_reward_model(folder, tokenizer=tokenizer, chat_template_kwargs=chat_template_kwargs,
                                               batch_size=batch_size, device=device)
            loaded.append(RewardFunction(Path(name.rstrip("/")).name, model, "model", name))
            continue
        if "/" in name or name.startswith((".", "~")):
            raise RewardError(f"reward function {name!r} is neither an existing folder nor a Hub id in the local "
                              f"Hugging Face cache (nothing is downloaded). Expected {_EXPECTED}")
        try:
            fn = load_user_function(name, "reward function")
        except UserFunctionError as err:
            if err.reason in ("not_dotted", "module_not_found"):
                raise RewardError(f"{err}; nor is it a reward-model folder. Expected {_EXPECTED}") from None
            raise RewardError(str(err)) from None
        loaded.append(RewardFunction(getattr(fn, "__name__", name.rpartition(".")[2]), fn, "function", name))
    return loaded


def load_rollout_function(name: str) -> Callable:
    """The `trl.rollout_func` callable `module.fn`, imported from the working directory."""
    try:
        return load_user_function(str(name), "rollout_func")
    except UserFunctionError as err:
        raise RewardError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Model rewards


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds tensors
class SequenceRewardModel:
    """A `...ForSequenceClassification` folder as a reward function: `model(prompts, completions)` is
    the list of score[:, 0] (TRL reads the first label) of each `prompt + completion` text.

    `texts` builds what is scored; `scores` runs our forward (`pure.models.llama.forward`) and the
    sequence head (`pure.models.heads.sequence_scores`) at the last non-pad token, without gradient,
    `batch_size` rows at a time, each batch right-padded to its longest row.
    """

    params: dict = field(repr=False)
    config: Any = field(repr=False)
    score_weight: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    pad_token_id: int
    chat_template_kwargs: dict = field(default_factory=dict)
    batch_size: int = 8
    folder: str = ""

    def texts(self, prompts: Sequence, completions: Sequence) -> list[str]:
        """`prompt + completion` per row: chat rows through the chat template (the whole conversation,
        no generation prompt, as TRL's `apply_chat_template` renders `messages`), plain rows joined."""
        texts = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            if is_chat_prompt(prompt):
                if isinstance(completion, str):
                    completion = [{"role": "assistant", "content": completion}]
                texts.append(self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False,
                                                                **self.chat_template_kwargs))
            elif isinstance(prompt, str) and isinstance(completion, str):
                texts.append(prompt + completion)
            else:
                raise RewardError(f"reward model {self.folder}: row {i} pairs a {type(prompt).__name__} prompt with a "
                                  f"{type(completion).__name__} completion; expected two strings or chat messages")
        return texts

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def scores(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 [N, num_labels]: the head at each row's last non-pad token."""
        import torch

        from pure.models.heads import last_non_pad_index, sequence_scores
        from pure.models.llama import forward

        device = self.score_weight.device
        out = []
        with torch.inference_mode():
            for start in range(0, len(token_ids), self.batch_size):
                rows = token_ids[start:start + self.batch_size]
                width = max(1, max(len(r) for r in rows))
                ids = torch.tensor([list(r) + [self.pad_token_id] * (width - len(r)) for r in rows],
                                   dtype=torch.long, device=device)
                hidden = forward(self.params, ids, self.config, compute_logits=False).hidden
                out.append(sequence_scores(hidden, last_non_pad_index(ids, self.pad_token_id), self.score_weight))
        return torch.cat(out).float().cpu()

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return self.scores(self.token_ids(self.texts(prompts, completions)))[:, 0].tolist()


def _read_score_weight(folder: Path):
    """`score.weight` from the folder's safetensors (single file or shards)."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        file = json.loads(index.read_text()).get("weight_map", {}).get("score.weight")
        files = [folder / file] if file else []
    else:
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if "score.weight" in f.keys():
                return f.get_tensor("score.weight")
    raise RewardError(f"reward model {folder}: no score.weight in its safetensors weights; expected the "
                      "score head of a ...ForSequenceClassification model")


def load_sequence_reward_model(folder, *, tokenizer=None, chat_template_kwargs: Mapping | None = None,
                               batch_size: int = 8, device: str = "cpu") -> SequenceRewardModel:
    """A reward-model folder as a `SequenceRewardModel`: `backends.hf.load_pretrained` for the body
    and tokenizer, `score.weight` for the head; the architecture must be a sequence classifier.

    The pad id (which finds each row's last token) is the tokenizer's pad token, else its EOS token,
    as TRL sets the reward model's `pad_token_id` from its tokenizer.
    """
    import json

    import torch

    from backends.hf import ModelLoadError, load_pretrained

    folder = Path(folder)
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as err:
        raise RewardError(f"reward model {folder}: no readable config.json ({err}); expected {_EXPECTED}") from None
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise RewardError(f"reward model {folder}: config.json names {architectures or 'no architecture'}; a reward "
                          "model must be a ...ForSequenceClassification (python -m programs.rm with "
                          "reward_model: true)")
    try:
        params, config, own_tokenizer = load_pretrained(folder, dtype=torch.float32)
    except ModelLoadError as err:
        raise RewardError(f"reward model {folder}: {err}") from None
    tokenizer = own_tokenizer if own_tokenizer is not None else tokenizer
    if tokenizer is None:
        raise RewardError(f"reward model {folder} has no tokenizer files and none was given")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise RewardError(f"reward model {folder}: its tokenizer has neither a pad nor an EOS token, so the "
                          "last token of a padded row cannot be found")
    weight = _read_score_weight(folder).to(torch.float32)
    if weight.ndim != 2 or weight.shape[1] != config.hidden_size:
        raise RewardError(f"reward model {folder}: score.weight has shape {list(weight.shape)}; expected "
                          f"[num_labels, hidden_size={config.hidden_size}]")
    params = {k: v.to(device) for k, v in params.items()}
    return SequenceRewardModel(params, config, weight.to(device), tokenizer, int(pad),
                               dict(chat_template_kwargs or {}), int(batch_size), str(folder))


# ---------------------------------------------------------------------------------------------
# Calling and checking


def shape_completions(prompts: Sequence, texts: Sequence[str]) -> list:
    """The `completions` argument reward functions get: `[{"role": "assistant", "content": text}]`
    for a chat prompt, the text itself for a plain prompt (TRL's shapes, without a bootstrap: the
    current GRPOTrainer no longer prepends a final assistant prompt message to the completion)."""
    if len(prompts) != len(texts):
        raise ValueError(f"shape_completions: {len(prompts)} prompts but {len(texts)} completion texts")
    return [[{"role": "assistant", "content": text}] if is_chat_prompt(prompt) else text
            for prompt, text in zip(prompts, texts)]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _slice_call(call: dict, n: int, start: int, stop: int) -> dict:
    """The rows [start, stop) of a call's arguments: lists of one value per row are sliced, other
    values (a trainer state, a logging callback) go as they are."""
    return {k: (v[start:stop] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in call.items()}


def _check_rewards(label: str, output: Any, n: int, row_offset: int) -> list[float]:
    """One float per row, NaN for None; anything else is a RewardError naming the function and row."""
    if not isinstance(output, (list, tuple)) and hasattr(output, "tolist"):  # a numpy array or tensor
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        raise RewardError(f"reward function {label} returned a {type(output).__name__}; expected a list of {n} "
                          "numbers (None to leave a row out)")
    if len(output) != n:
        raise RewardError(f"reward function {label} returned {len(output)} values for {n} completions; "
                          f"expected {n}, one per completion")
    values = []
    for i, value in enumerate(output):
        if value is None:
            values.append(math.nan)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            values.append(float(value))
        else:
            raise RewardError(f"reward function {label} returned {value!r} on row {row_offset + i}; expected a "
                              "finite int, float or bool (None to leave the row out)")
    return values


def call_reward(label: str, fn: Callable, call: dict, n: int, row_offset: int = 0) -> list[float]:
    """`fn(**call)` checked: one float per row (NaN for None). When it raises, the rows are re-run one at
    a time to name the first one that fails alone."""
    try:
        output = fn(**call)
    except RewardError:  # a model reward's own, already one line
        raise
    except Exception as err:
        if n > 1:
            for i in range(n):
                try:
                    fn(**_slice_call(call, n, i, i + 1))
                except Exception as row_err:
                    raise RewardError(f"reward function {label} raised {_one_line(row_err)} on row "
                                      f"{row_offset + i}") from None
        where = f"row {row_offset}" if n == 1 else (f"the batch of rows {row_offset}..{row_offset + n - 1} "
                                                    "(no row raises when called alone)")
        raise RewardError(f"reward function {label} raised {_one_line(err)} on {where}") from None
    return _check_rewards(label, output, n, row_offset)


def _reward_call(prompts: list, completions: list, completion_ids: list, columns: Mapping[str, Any]) -> dict:
    n = len(prompts)
    if not len(completions) == len(completion_ids) == n:
        raise ValueError(f"score_completions: {n} prompts, {len(completions)} completions and "
                         f"{len(completion_ids)} completion_ids; expected one of each per row")
    kwargs = {}
    for key, value in columns.items():
        if key in RESERVED_COLUMNS:
            continue
        if key in _CALL_ARGUMENTS:
            raise RewardError(f"dataset column {key!r} clashes with the reward-function argument of the same name; "
                              "rename the column in the dataset transform")
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"score_completions: column {key!r} has {len(value)} values for {n} completions")
        kwargs[key] = value
    return {"prompts": list(prompts), "completions": list(completions), "completion_ids": list(completion_ids),
            **kwargs}


def _check_groups(n: int, num_generations: int) -> None:
    if num_generations < 1 or n % num_generations:
        raise ValueError(f"score_completions: {n} completions are not whole groups of "
                         f"num_generations={num_generations}")


def _group_shards(n: int, num_generations: int, num_workers: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering 0..n, each a run of whole groups of `num_generations` rows,
    as even as possible over at most `num_workers` shards."""
    _check_groups(n, num_generations)
    groups = n // num_generations
    shards = max(1, min(num_workers, groups))
    bounds = [groups * k // shards for k in range(shards + 1)]
    return [(a * num_generations, b * num_generations) for a, b in zip(bounds, bounds[1:]) if b > a]


def _score_shard(sources: Sequence[str], call: dict, n: int, row_offset: int) -> list[list[float]]:
    """In a worker: every function reward, imported by name, on one shard of rows."""
    out = []
    for source in sources:
        try:
            fn = load_user_function(source, "reward function")
        except UserFunctionError as err:
            raise RewardError(f"in a reward worker: {err}") from None
        out.append(call_reward(source, fn, call, n, row_offset))
    return out


def _worker_start(cwd: str) -> None:
    """A worker's set-up: the parent's working directory, and on sys.path, so user modules import."""
    os.chdir(cwd)
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


class RewardPool:
    """`num_workers` spawned processes running the function rewards named by `funcs` (dotted paths, or
    RewardFunctions whose source is one; model rewards are skipped: they run in the main process).

    Created once and reused for every batch; `close()` (or leaving a `with` block) stops the workers.
    Spawn, not fork: the parent holds torch threads and maybe a GPU context, which a fork copies badly.
    """

    def __init__(self, funcs: Sequence[str | RewardFunction], num_workers: int):
        if num_workers < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {num_workers}")
        self.sources = tuple(f if isinstance(f, str) else f.source for f in funcs
                             if isinstance(f, str) or f.kind == "function")
        unnamed = [f.name for f in funcs if not isinstance(f, str) and f.kind == "function" and not f.source]
        if unnamed:
            raise ValueError(f"RewardPool: reward functions {unnamed} have no dotted path (source), so a worker "
                             "process cannot import them")
        self.num_workers = num_workers
        self._executor = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_start, initargs=(os.getcwd(),))

    def score(self, call: dict, n: int, num_generations: int) -> list[list[float]]:
        """Per function, one float per row: the rows sharded by whole prompt groups, reassembled in order."""
        shards = _group_shards(n, num_generations, self.num_workers)
        futures = [self._executor.submit(_score_shard, self.sources, _slice_call(call, n, a, b), b - a, a)
                   for a, b in shards]
        try:
            parts = [future.result() for future in futures]
        except RewardError:
            raise
        except BrokenProcessPool as err:
            raise RewardError(f"a reward worker process died while scoring ({err}); a reward function may have "
                              "exited or crashed the interpreter") from None
        except Exception as err:  # the batch could not be sent: pickling, mostly
            raise RewardError(f"the reward workers could not take this batch: {_one_line(err)} (every column "
                              "must be picklable to reach a worker process)") from None
        return [[v for part in parts for v in part[k]] for k in range(len(self.sources))]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_completions(funcs: Sequence[RewardFunction], *, prompts: list, completions: list,
                      completion_ids: list[list[int]], columns: Mapping[str, list], num_generations: int,
                      num_workers: int = 1, pool: RewardPool | None = None) -> torch.Tensor:
    """float64 [N, K]: reward k of completion i, NaN where it returned None; weights not applied.

    Each function gets `prompts`, `completions` (already shaped: `shape_completions`),
    `completion_ids` and the columns (one value per completion; `prompt`, `completion`,
    `completion_ids` and `prompt_ids` are left out, as TRL leaves them out). Function rewards run in
    `pool` when one is given (its functions must be these), else in a pool made for this call when
    `num_workers > 1`, else here; N must be whole groups of `num_generations` rows either way.
    """
    import torch

    call = _reward_call(prompts, completions, completion_ids, columns)
    n = len(prompts)
    _check_groups(n, num_generations)
    scores = torch.full((n, len(funcs)), math.nan, dtype=torch.float64)
    functions = [k for k, f in enumerate(funcs) if f.kind == "function"]
    if functions and (pool is not None or num_workers > 1):
        own = pool is None
        pool = RewardPool([funcs[k] for k in functions], num_workers) if own else pool
        try:
            wanted = tuple(funcs[k].source for k in functions)
            if pool.sources != wanted:
                raise ValueError(f"score_completions: the pool runs {list(pool.sources)} but the function rewards "
                                 f"are {list(wanted)}")
            for k, values in zip(functions, pool.score(call, n, num_generations)):
                scores[:, k] = torch.tensor(values, dtype=torch.float64)
        finally:
            if own:
                pool.close()
        remaining = [k for k in range(len(funcs)) if k not in functions]
    else:
        remaining = list(range(len(funcs)))
    for k in remaining:
        scores[:, k] = torch.tensor(call_reward(funcs[k].label, funcs[k].fn, call, n), dtype=torch.float64)
    return scores

"""The training programs under `torchrun --nproc_per_node 2` (gloo, CPU, tiny model) against the
same config in one process: SFT (DDP LoRA, FSDP2 full, DeepSpeed ZeRO-2 full), DPO, KTO and a
reward model; checkpoints resumed at 2 ranks (bitwise) and across world sizes; the consolidation of a
sharded checkpoint; a rank killed mid-run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from programs.config import load_config
from tests.programs.test_grpo import workdir  # noqa: F401 (the fixture: reward module, prompts, chdir)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not in this torch build")

# fp32: two ranks add the same terms in another order (per-rank sums, then the all-reduce or
# reduce-scatter), so the runs agree to rounding, not bitwise. Adam's g / sqrt(v) turns the rounding
# of the smallest gradients into relative changes of the update, which compound over the steps:
# 1e-4 relative (~1000 ulps) after 6 steps; a wrong shard or a missed reduction is off by far more.
RTOL = 1e-4


# 3 rows per micro-batch: the ranks take unequal shares (part of the test); no dropout: the ranks draw
# their own masks; 6 steps, saved and evaluated at 3
SFT_KEYS = dict(lora_dropout=0.0, neftune_noise_alpha=None, micro_batch_size=3, max_steps=6, save_steps=3,
                eval_steps=3)


def sft_config(tmp_path: Path, tiny_model, name: str, **overrides) -> Path:
    from tests.programs.test_sft import write_config

    return write_config(tmp_path, tiny_model, name, **{**SFT_KEYS, **overrides})


def preference_config(tmp_path: Path, tiny_model, name: str, rl, **overrides) -> Path:
    from tests.programs.test_preference import write_config

    return write_config(tmp_path, tiny_model, name, rl=rl, **{"lora_dropout": 0.0, "micro_batch_size": 3, **overrides})


def torchrun(program: str, config: Path, *args: str, nproc: int = 2, check: bool = True,
             cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
                           "-m", program, "--config", str(config), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def one_process(program: str, config: Path, *args: str) -> None:
    import importlib

    assert importlib.import_module(program).main(["--config", str(config), *args]) == 0


def train_metrics(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in records if "train/loss" in r]


def eval_metrics(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]


def assert_runs_agree(two: Path, one: Path, export: str) -> None:
    got, want = train_metrics(two), train_metrics(one)
    assert [r[0] for r in got] == [r[0] for r in want] and got
    for g, w in zip(got, want):
        assert g[1:] == pytest.approx(w[1:], rel=RTOL, abs=1e-6), (g, w)
    for g, w in zip(eval_metrics(two), eval_metrics(one), strict=True):
        assert g == pytest.approx(w, rel=RTOL)
    assert_close_files(two / export, one / export)


def assert_close_files(got_file: Path, want_file: Path) -> None:
    """Every tensor within RTOL, and within 1e-3 of the tensor's own scale elementwise: an element
    whose gradient is at rounding level gets Adam's update of about +-lr either way (DPO's first steps,
    where policy = reference), so it agrees with the tensor's scale, not its own value. A wrong shard
    or a missed reduction is off by the scale itself in many elements."""
    got, want = load_file(str(got_file)), load_file(str(want_file))
    assert got.keys() == want.keys()
    for name, value in want.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=max(1e-6, 1e-3 * scale), msg=name)


def assert_bitwise_equal_files(got_file: Path, want_file: Path) -> None:
    got, want = load_file(str(got_file)), load_file(str(want_file))
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


# ---- SFT: DDP (LoRA), FSDP2 and ZeRO-2 (full) at 2 ranks equal one process -------------------


def test_lora_sft_at_two_ranks_equals_one_process_and_only_rank_0_writes(tmp_path, tiny_model):
    config = sft_config(tmp_path, tiny_model, "two")
    proc = torchrun("programs.sft", config)
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one"))
    assert_runs_agree(tmp_path / "two", tmp_path / "one", "adapter_model.safetensors")
    assert "distributed: 2 processes over gloo" in proc.stdout and "ddp: trained params replicated" in proc.stdout
    assert proc.stdout.count("exported to") == 1 and proc.stdout.count("training 4,096 params") == 1  # rank 0 prints
    # DDP saves FULL_STATE_DICT checkpoints: one process's format, written by rank 0
    assert (tmp_path / "two" / "checkpoint-6" / "state.safetensors").is_file()


@pytest.mark.parametrize("packing", [True, False])
def test_one_row_steps_at_two_ranks_equal_one_process(tmp_path, tiny_model, packing):
    # the demo's shape: micro_batch_size 1, no accumulation. Packed, the row's documents are split
    # over the ranks; unpacked, the row is one document, which one rank takes, and the other adds zero
    # gradients and zero metrics (read from a no-grad forward of one row: the document-attention
    # kernel takes no zero-row batch). No dropout: each rank draws its own masks.
    keys = dict(micro_batch_size=1, gradient_accumulation_steps=1, max_steps=4, sample_packing=packing)
    torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", **keys))
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one", **keys))
    assert_runs_agree(tmp_path / "two", tmp_path / "one", "adapter_model.safetensors")


FSDP2 = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT",
                                             "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_model):
    """A full fine-tune with FSDP2 (sharded checkpoints) at 2 ranks and in one process."""
    root = tmp_path_factory.mktemp("fsdp")
    keys = dict(adapter=None, learning_rate=1e-3, **FSDP2)
    two = torchrun("programs.sft", sft_config(root, tiny_model, "two", **keys))
    one_process("programs.sft", sft_config(root, tiny_model, "one", **keys))
    return root, keys, two


def test_fsdp_full_fine_tune_at_two_ranks_equals_one_process(fsdp_runs):
    root, _, proc = fsdp_runs
    assert_runs_agree(root / "two", root / "one", "model/model.safetensors")
    assert "fsdp2: trained params sharded, gradients reduce-scattered, optimizer state sharded" in proc.stdout
    assert "transformer_layer_cls_to_wrap: no effect" in proc.stdout
    assert "reshard_after_forward: true: the sharded params are gathered whole once per step" in proc.stdout
    shards = sorted(p.name for p in (root / "two" / "checkpoint-6").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.json"]


def test_a_two_rank_sharded_checkpoint_resumes_bitwise_at_two_ranks(fsdp_runs, tiny_model):
    root, keys, _ = fsdp_runs
    config = sft_config(root, tiny_model, "resumed2", resume_from_checkpoint=str(root / "two" / "checkpoint-3"), **keys)
    torchrun("programs.sft", config)
    assert train_metrics(root / "resumed2") == train_metrics(root / "two")[3:]
    assert_bitwise_equal_files(root / "resumed2" / "model" / "model.safetensors",
                               root / "two" / "model" / "model.safetensors")


def test_a_two_rank_sharded_checkpoint_resumes_in_one_process_and_a_one_process_one_at_two_ranks(fsdp_runs, tiny_model):
    root, keys, _ = fsdp_runs
    # 2 -> 1: the 2-rank state of step 3 goes on in one process to what the one-process run reaches
    one_process("programs.sft", sft_config(root, tiny_model, "resumed1",
                                           resume_from_checkpoint=str(root / "two" / "checkpoint-3"), **keys))
    assert_close_files(root / "resumed1" / "model" / "model.safetensors", root / "one" / "model" / "model.safetensors")
    # 1 -> 2: a one-process sharded checkpoint (FSDP2's SHARDED_STATE_DICT in one process) at 2 ranks
    torchrun("programs.sft", sft_config(root, tiny_model, "from1", resume_from_checkpoint=str(root / "one" / "checkpoint-3"),
                                        **keys))
    assert_close_files(root / "from1" / "model" / "model.safetensors", root / "two" / "model" / "model.safetensors")
    assert [r[0] for r in train_metrics(root / "from1")] == [4, 5, 6]


def test_a_one_process_plain_checkpoint_resumes_at_two_ranks(tmp_path, tiny_model):
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one"))
    assert (tmp_path / "one" / "checkpoint-3" / "state.safetensors").is_file()
    torchrun("programs.sft", sft_config(tmp_path, tiny_model, "from1",
                                        resume_from_checkpoint=str(tmp_path / "one" / "checkpoint-3")))
    assert_close_files(tmp_path / "from1" / "adapter_model.safetensors", tmp_path / "one" / "adapter_model.safetensors")


def test_consolidating_the_sharded_checkpoint_equals_the_unsharded_export(fsdp_runs, tiny_model):
    root, keys, _ = fsdp_runs
    from programs import merge_sharded_fsdp_weights

    config = sft_config(root, tiny_model, "two", **keys)
    assert merge_sharded_fsdp_weights.main(["--config", str(config)]) == 0
    assert_bitwise_equal_files(root / "two" / "merged" / "model.safetensors", root / "two" / "model" / "model.safetensors")


def test_deepspeed_zero2_full_fine_tune_at_two_ranks_equals_one_process(tmp_path, tiny_model):
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"},
                                                     "train_micro_batch_size_per_gpu": "auto"}))
    keys = dict(adapter=None, learning_rate=1e-3, deepspeed=str(tmp_path / "zero2.json"), max_steps=3, save_steps=3)
    proc = torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", **keys))
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one", **keys))
    assert_runs_agree(tmp_path / "two", tmp_path / "one", "model/model.safetensors")
    assert ("deepspeed zero2.json: run as DTensor sharding of gradients and optimizer state (ZeRO-2)" in proc.stdout)
    assert "trained params replicated, gradients reduce-scattered, optimizer state sharded" in proc.stdout
    assert (tmp_path / "two" / "checkpoint-3" / "__1_0.distcp").is_file()  # ZeRO-2 saves sharded checkpoints


def test_final_state_dict_type_sharded_leaves_the_sharded_checkpoint_as_the_result(tmp_path, tiny_model):
    keys = dict(adapter=None, learning_rate=1e-3, max_steps=3, save_steps=3, fsdp_version=2,
                fsdp_config={"state_dict_type": "SHARDED_STATE_DICT", "final_state_dict_type": "SHARDED_STATE_DICT"})
    proc = torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", **keys))
    assert "consolidate it with python -m programs.merge_sharded_fsdp_weights" in proc.stdout
    assert not (tmp_path / "two" / "model").exists() and (tmp_path / "two" / "checkpoint-3" / ".metadata").is_file()


def test_a_streamed_dataset_at_two_ranks_equals_one_process(tmp_path, tiny_model):
    # every rank reads the same stream (tokenised and packed as training consumes it) and trains on
    # its documents of each micro-batch
    keys = dict(streaming=True, val_set_size=0, max_steps=4, save_steps=2, eval_steps=None,
                streaming_multipack_buffer_size=16)
    torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", **keys))
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one", **keys))
    assert_runs_agree(tmp_path / "two", tmp_path / "one", "adapter_model.safetensors")


# ---- tensor parallelism ------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lora", None])
def test_tensor_parallel_sft_at_two_ranks_equals_one_process(tmp_path, tiny_model, adapter):
    # the tiny model's 4 heads, 2 kv heads and 64 MLP columns split over 2 TP ranks; both ranks run
    # every row; sharded checkpoints hold the TP shards (Shard(0) / Shard(1) DTensors)
    keys = dict(adapter=adapter, learning_rate=1e-3 if adapter is None else 1e-2, fsdp_version=2,
                fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"})
    proc = torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", tensor_parallel_size=2, **keys))
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one", **keys))
    export = "adapter_model.safetensors" if adapter else "model/model.safetensors"
    assert_runs_agree(tmp_path / "two", tmp_path / "one", export)
    assert "tensor parallel: q/k/v/gate/up split by output features" in proc.stdout
    from backends.checkpoint import is_sharded_checkpoint

    assert is_sharded_checkpoint(tmp_path / "two" / "checkpoint-6")


def test_a_tensor_parallel_checkpoint_resumes_in_one_process(tmp_path, tiny_model):
    keys = dict(fsdp_version=2, fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"})
    torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", tensor_parallel_size=2, **keys))
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one", **keys))
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "resumed",
                                           resume_from_checkpoint=str(tmp_path / "two" / "checkpoint-3"), **keys))
    assert_close_files(tmp_path / "resumed" / "adapter_model.safetensors", tmp_path / "one" / "adapter_model.safetensors")


# ---- the other training programs -------------------------------------------------------------


@pytest.mark.parametrize("rl, program, export, keys", [
    ("dpo", "programs.dpo", "adapter_model.safetensors", {}),
    ("kto", "programs.kto", "adapter_model.safetensors", {"data": "kto"}),
    (None, "programs.rm", "adapter_model.safetensors", {"reward_model": True, "num_labels": 1,
                                                        "type_": "bradley_terry.chat_template",
                                                        "chat_template": "tokenizer_default"}),
])
def test_preference_and_reward_programs_at_two_ranks_equal_one_process(tmp_path, tiny_model, rl, program, export, keys):
    # DPO and the reward model split their pair batches by pairs; KTO's KL baseline is a statistic of
    # the whole global batch, computed on every rank
    torchrun(program, preference_config(tmp_path, tiny_model, "two", rl, **keys))
    one_process(program, preference_config(tmp_path, tiny_model, "one", rl, **keys))
    assert_runs_agree(tmp_path / "two", tmp_path / "one", export)


# ---- refusals and faults ---------------------------------------------------------------------


def test_sizes_that_need_torchrun_are_refused_in_one_process(tmp_path, tiny_model, capsys):
    from programs import sft

    config = sft_config(tmp_path, tiny_model, "one", adapter=None, dp_shard_size=2, **FSDP2)
    with pytest.raises(SystemExit):
        sft.main(["--config", str(config)])
    assert "dp_shard_size: 2 needs more than one process; launch with torchrun" in capsys.readouterr().err


def test_under_torchrun_torch_compile_is_refused_by_key_on_every_rank(tmp_path, tiny_model):
    proc = torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", torch_compile=True), check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: torch_compile: true is not supported under torchrun (2 processes) yet") == 2


def test_grpo_at_two_ranks_equals_one_process(workdir, tiny_model):
    # every rank samples and scores the same generations with the gathered policy (the native engine,
    # the state's keys), then trains on its rows; the one-process run takes torchrun's one thread, so
    # the sampled tokens are the same too
    from tests.programs.test_grpo import write_config

    keys = dict(lora_dropout=0.0, trl={"beta": 0.04})
    torchrun("programs.grpo", write_config(workdir, tiny_model, "two", **keys), cwd=workdir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_process("programs.grpo", write_config(workdir, tiny_model, "one", **keys))
    finally:
        torch.set_num_threads(threads)
    assert_runs_agree(workdir / "two", workdir / "one", "adapter_model.safetensors")
    def rewards(out: Path) -> list:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("reward"), r.get("eval/reward")) for r in records if "reward" in r or "eval/reward" in r]

    assert rewards(workdir / "two") == rewards(workdir / "one") and rewards(workdir / "one")


def test_grpo_through_a_vllm_server_at_two_ranks_equals_one_process(tmp_path, vllm_server, monkeypatch):
    # rank 0 alone syncs the LoRA to the server, samples and scores; rank 1 receives the generations;
    # the server's seeded requests give the one-process run the same completions
    from tests.programs.test_grpo_vllm import REWARDS, write_config

    (tmp_path / "vllm_rewards_mod.py").write_text(REWARDS)
    rows = (DATA / "arithmetic_train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:16]) + "\n")
    monkeypatch.chdir(tmp_path)
    keys = dict(lora_dropout=0.0, max_steps=3)
    torchrun("programs.grpo", write_config(tmp_path, vllm_server, "two", **keys), cwd=tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_process("programs.grpo", write_config(tmp_path, vllm_server, "one", **keys))
    finally:
        torch.set_num_threads(threads)
    assert_runs_agree(tmp_path / "two", tmp_path / "one", "adapter_model.safetensors")

    def rewards(out: Path) -> list:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["reward"]) for r in records if "reward" in r]

    assert rewards(tmp_path / "two") == rewards(tmp_path / "one") and len(rewards(tmp_path / "one")) == 3


def test_grpo_with_colocated_vllm_under_torchrun_is_refused_by_key_before_anything_loads(tmp_path, tiny_model):
    proc = torchrun("programs.grpo", REPO / "configs" / "grpo-smollm2.yaml", "--base_model", str(tiny_model),
                    "--output_dir", str(tmp_path / "grpo"), "--use_vllm", "true", "--trl.vllm_mode", "colocate",
                    check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: trl.vllm_mode: colocate is not supported under torchrun (2 processes) yet") == 2
    assert not (tmp_path / "grpo").exists()


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (from their RANK environment variable)."""
    found = {}
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
            stat = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == launcher.pid:  # parent pid
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(proc_dir.name)
    return found


def test_a_rank_killed_mid_run_stops_the_others_with_a_clear_error_and_no_half_written_checkpoint(tmp_path, tiny_model):
    keys = dict(adapter=None, learning_rate=1e-3, max_steps=400, save_steps=2, eval_steps=None, val_set_size=0, **FSDP2)
    config = sft_config(tmp_path, tiny_model, "killed", **keys)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                                 "-m", "programs.sft", "--config", str(config)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    deadline = time.time() + 180
    while not (out / "checkpoint-4").is_dir() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = _rank_pids(launcher)
    assert launcher.poll() is None and set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "lost another process of the run" in stderr, stderr[-4000:]
    # every checkpoint folder left is complete; an interrupted save left at most a .tmp folder
    from backends.checkpoint import CHECKPOINT_RE, is_sharded_checkpoint

    folders = [p for p in out.iterdir() if CHECKPOINT_RE.match(p.name)]
    assert folders and all(is_sharded_checkpoint(p) for p in folders), folders
    # and the run goes on from the last of them
    last = max(int(p.name.split("-")[1]) for p in folders)
    shutil.rmtree(out / "runs", ignore_errors=True)
    proc = torchrun("programs.sft", sft_config(tmp_path, tiny_model, "killed", auto_resume_from_checkpoints=True,
                                               **{**keys, "max_steps": last + 2}), check=False)
    assert f"resumed from {out / f'checkpoint-{last}'} at step {last}" in proc.stdout, proc.stderr[-3000:]


# ---- HSDP: dp_replicate x dp_shard -------------------------------------------------------------


def test_hsdp_full_fine_tune_at_four_ranks_equals_one_process(tmp_path, tiny_model):
    # sharded checkpoints, written from HSDP's 2-D placements
    keys = dict(adapter=None, learning_rate=1e-3, max_steps=3, save_steps=3, eval_steps=3, fsdp_version=2,
                fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"})
    proc = torchrun("programs.sft", sft_config(tmp_path, tiny_model, "four", dp_replicate_size=2, dp_shard_size=2,
                                               **keys), nproc=4)
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one", **keys))
    assert_runs_agree(tmp_path / "four", tmp_path / "one", "model/model.safetensors")
    assert "distributed: 4 processes over gloo, mesh {'dp_replicate': 2, 'dp_shard': 2, 'cp': 1, 'tp': 1}" in proc.stdout
    assert proc.stdout.count("exported to") == 1
    from backends.checkpoint import is_sharded_checkpoint

    assert is_sharded_checkpoint(tmp_path / "four" / "checkpoint-3")


# ---- context parallelism: the ranks share each packed micro-batch by tokens ---------------------


@pytest.mark.parametrize("adapter, export", [("lora", "adapter_model.safetensors"), (None, "model/model.safetensors")])
def test_packed_sft_at_context_parallel_two_equals_one_process(tmp_path, tiny_model, adapter, export):
    # FSDP2 at dp_shard 1 x cp 2: both ranks hold every micro-batch's rows and split their tokens
    keys = dict(adapter=adapter, max_steps=4, save_steps=4, eval_steps=4, fsdp_version=2, fsdp_config={},
                **({} if adapter else {"learning_rate": 1e-3}))
    proc = torchrun("programs.sft", sft_config(tmp_path, tiny_model, "two", context_parallel_size=2, **keys))
    one_process("programs.sft", sft_config(tmp_path, tiny_model, "one", **keys))
    assert_runs_agree(tmp_path / "two", tmp_path / "one", export)
    assert "mesh {'dp_replicate': 1, 'dp_shard': 1, 'cp': 2, 'tp': 1}" in proc.stdout


@pytest.mark.parametrize("kind, words", [("dpo", "needs SFT with sample_packing: true, not dpo"),
                                         ("unpacked", "not sft with sample_packing: False")])
def test_context_parallelism_of_pair_batches_or_unpacked_rows_is_refused_by_key(tmp_path, tiny_model, kind, words):
    from programs.config import ConfigError
    from programs.launch import refuse_in_world

    keys = dict(context_parallel_size=2, fsdp_version=2, fsdp_config={})
    path = preference_config(tmp_path, tiny_model, "two", "dpo", **keys) if kind == "dpo" else \
        sft_config(tmp_path, tiny_model, "two", sample_packing=False, **keys)
    with pytest.raises(ConfigError, match="context_parallel_size: 2 splits packed rows by tokens") as error:
        refuse_in_world(load_config(path), 2)
    assert words in str(error.value)

"""GRPO through the run's real vLLM server (tests/conftest.py): LoRA sync and full-weight sync keep
the server on the trained policy (its sampling log-probs match our forward on the new weights),
`vllm_sync_interval` leaves it stale in between, and a server killed mid-run stops the run with a
clear error and a checkpoint, from which a rerun resumes to the same result as a run never stopped."""
import os
from pathlib import Path

import pytest
import yaml

from programs import grpo
from programs.config import ConfigError, load_config

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"
REWARDS = '''
import os, signal

CALLS = [0]  # calls while a kill is armed (the module stays imported across the tests of a run)

def length_reward(completions, **kwargs):
    if os.environ.get("KILL_VLLM_PGID"):
        CALLS[0] += 1
        if CALLS[0] == int(os.environ["KILL_VLLM_AT_CALL"]):
            os.killpg(int(os.environ.pop("KILL_VLLM_PGID")), signal.SIGKILL)   # the server crashes mid-run
    return [float(len(c[0]["content"]) % 5) for c in completions]

def to_prompt(cfg, *args, **kwargs):
    def map_fn(example, tokenizer=None):
        return {"prompt": [{"role": "user", "content": example["messages"][0]["content"]}]}
    return map_fn, {"remove_columns": ["messages"]}
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "vllm_rewards_mod.py").write_text(REWARDS)
    rows = (DATA / "arithmetic_train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:16]) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(workdir, server, name, trl=None, **overrides):
    raw = {
        "base_model": str(server.model), "rl": "grpo", "chat_template": "tokenizer_default",
        "datasets": [{"path": str(workdir / "train.jsonl"), "type": "vllm_rewards_mod.to_prompt"}],
        "sequence_len": 128, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4, "learning_rate": 5e-2,
        "optimizer": "adamw_torch", "save_steps": 2, "logging_steps": 1, "output_dir": str(workdir / name), "seed": 5,
        "trl": {"num_generations": 4, "max_completion_length": 6, "temperature": 1.0,
                "reward_funcs": ["vllm_rewards_mod.length_reward"], "use_vllm": True,
                "vllm_server_host": server.host, "vllm_server_port": server.port, "vllm_lora_sync": True,
                **(trl or {})},
    }
    raw.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def records_of(result):
    return [r for r in result["records"] if "train/loss" in r]


def comparable(records):
    return [{k: v for k, v in r.items() if "per_second" not in k and "rss" not in k and not k.startswith("time/")}
            for r in records]


# vLLM's fp32 kernels against ours on the same weights: the server tests measure 2.3e-5..3.4e-5 per token
SAME_WEIGHTS = 1e-3


@pytest.fixture(scope="module")
def lora_run(vllm_server, tmp_path_factory):
    """Four GRPO steps through the server with LoRA sync every step (shared by the tests below)."""
    workdir = tmp_path_factory.mktemp("grpo-vllm")
    (workdir / "vllm_rewards_mod.py").write_text(REWARDS)
    rows = (DATA / "arithmetic_train.jsonl").read_text().splitlines()
    (workdir / "train.jsonl").write_text("\n".join(rows[:16]) + "\n")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        yield workdir, grpo.run(load_config(write_config(workdir, vllm_server, "lora")))
    finally:
        os.chdir(cwd)


def test_lora_sync_keeps_the_server_on_the_trained_policy(lora_run):
    _, result = lora_run
    records = records_of(result)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and not result["stopped"]
    for r in records:
        # the IS correction is on by default with vLLM (TRL); its metrics say the server sampled our policy
        assert r["sampling/sampling_logp_difference/max"] < SAME_WEIGHTS, r
        assert abs(r["sampling/importance_sampling_ratio/mean"] - 1) < SAME_WEIGHTS, r
    # the policy moved (so a server left on old weights would have shown a difference above)
    assert records[-1]["train/grad_norm"] > 0 and len({round(r["train/loss"], 6) for r in records}) > 1


def test_full_weight_sync_through_the_server(workdir, vllm_server):
    result = grpo.run(load_config(write_config(workdir, vllm_server, "full", trl={"vllm_lora_sync": False},
                                               max_steps=2)))
    for r in records_of(result):
        assert r["sampling/sampling_logp_difference/max"] < SAME_WEIGHTS, r


def test_sync_interval_leaves_the_server_stale_in_between(workdir, vllm_server):
    result = grpo.run(load_config(write_config(workdir, vllm_server, "interval", trl={"vllm_sync_interval": 2},
                                               max_steps=3)))
    diff = [r["sampling/sampling_logp_difference/max"] for r in records_of(result)]
    # steps 1 and 3 sample right after a sync; step 2 samples the step-0 policy after one update of lr 5e-2
    assert diff[0] < SAME_WEIGHTS and diff[2] < SAME_WEIGHTS and diff[1] > 10 * SAME_WEIGHTS, diff


def test_no_server_at_start_is_one_line(workdir, vllm_server, capsys):
    from backends.rollout.vllm_server import free_port

    path = write_config(workdir, vllm_server, "nobody", trl={"vllm_server_port": free_port()})
    with pytest.raises(ConfigError, match=r"no vLLM server answers at 127.0.0.1:\d+ .*programs.vllm_serve"):
        grpo.run(load_config(path))


def test_a_server_killed_mid_run_checkpoints_and_the_rerun_resumes(workdir, vllm_server, lora_run, capsys,
                                                                  monkeypatch):
    """Last in this file: it kills the run's server (and restarts it for the rerun)."""
    path = write_config(workdir, vllm_server, "lora")  # the config of `lora_run`, in another output_dir
    monkeypatch.setenv("KILL_VLLM_PGID", str(vllm_server.server_pid()))
    monkeypatch.setenv("KILL_VLLM_AT_CALL", "2")  # while step 2 scores its rollouts
    try:
        with pytest.raises(SystemExit) as stopped:
            grpo.main(["--config", str(path)])
    finally:
        vllm_server.restart()  # a new server (on a new port) for the rerun and the tests after this one
    assert stopped.value.code != 0
    # one line of ours (the datasets library may draw its progress bar on stderr too)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Generating")]
    assert len(err) == 1 and "step 3 aborted: the vLLM server at 127.0.0.1:" in err[0], err
    checkpoint = workdir / "lora" / "checkpoint-2"
    assert f"--resume_from_checkpoint {checkpoint}" in err[0] and checkpoint.is_dir()

    rerun = write_config(workdir, vllm_server, "lora")
    result = grpo.run(load_config(rerun, ["--resume_from_checkpoint", str(checkpoint)]))
    assert result["step"] == 4
    # vLLM's seeded sampling is reproducible across server restarts: the rerun ends where an unbroken run ends
    assert comparable(records_of(result))[-2:] == comparable(records_of(lora_run[1]))[-2:]


def test_async_prefetch_through_the_server(workdir, vllm_server):
    """The producer thread syncs the policy it samples under (one step old) while the step trains."""
    result = grpo.run(load_config(write_config(workdir, vllm_server, "async", max_steps=3, trl={
        "use_data_producer": True, "async_prefetch": True, "prefetch_depth": 1})))
    diff = [r["sampling/sampling_logp_difference/max"] for r in records_of(result)]
    assert diff[0] < SAME_WEIGHTS and all(d > 10 * SAME_WEIGHTS for d in diff[1:]), diff


@pytest.mark.parametrize("lora_sync", [True, False])
def test_colocate_mode_trains_on_an_in_process_engine(workdir, vllm_server, lora_sync):
    """`vllm_mode: colocate` where vLLM is importable: programs.grpo run by the vLLM venv's Python."""
    import json
    import subprocess

    from backends.rollout.vllm_server import VLLM_VENV

    path = write_config(workdir, vllm_server, "colocate", max_steps=2,
                        trl={"vllm_mode": "colocate", "vllm_lora_sync": lora_sync})
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([str(VLLM_VENV / "bin" / "python"), "-m", "programs.grpo", "--config", str(path)],
                          cwd=workdir, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rollouts: in-process vLLM (colocate)" in done.stdout
    records = [json.loads(x) for x in (workdir / "colocate" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # synced from memory every step: the engine samples the trained policy
        assert r["sampling/sampling_logp_difference/max"] < SAME_WEIGHTS, r

"""The one real vLLM server of a pytest run (session-scoped, started on first use).

`python -m programs.vllm_serve` from `.venv-vllm` on a tiny random SmolLM2-family model (head size
64: vLLM's CPU attention kernels take the usual head sizes only), on 127.0.0.1 and a free port,
with LoRA serving and the dev endpoints for full-weight sync. Ctrl-C (SIGINT) at the end must stop
it and its children. A test that kills the server (the fault tests) calls `restart()`.
Outside CI, without the venv, the tests that use it skip with a reason naming the setup script."""
import os
import signal
import subprocess
import sys

import pytest


class VllmServer:
    def __init__(self, root, model, config, params, tokenizer):
        self.root, self.model, self.config, self.params, self.tokenizer = root, model, config, params, tokenizer
        self.proc, self.port, self.starts = None, None, 0

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        import yaml

        from backends.rollout.vllm_server import free_port, wait_healthy

        self.port = free_port()
        self.starts += 1
        serve = self.root / f"serve-{self.starts}.yaml"
        serve.write_text(yaml.safe_dump({
            "base_model": str(self.model), "datasets": [{"path": "unused.jsonl"}], "learning_rate": 1e-5,
            "adapter": "lora", "lora_r": 32,  # LoRA up to rank 32 (the GRPO quick start's)
            "lora_target_linear": True, "sequence_len": 256,
            "output_dir": str(self.root / "run"), "vllm": {"host": self.host, "port": self.port},
            "trl": {"vllm_lora_sync": True}}))
        self.log = self.root / f"serve-{self.starts}.out"
        self.proc = subprocess.Popen([sys.executable, "-m", "programs.vllm_serve", "--config", str(serve)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        wait_healthy(self.host, self.port, 400, self.proc, self.log)

    def engine(self, **kwargs):
        from backends.rollout.vllm_server import VllmServerEngine

        return VllmServerEngine(self.host, self.port, **kwargs)

    def server_pid(self) -> int:
        """The vLLM api_server process that programs.vllm_serve started (its process group leader)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0])

    def kill(self) -> None:
        """SIGKILL the vLLM server and its workers, as a crash would (programs.vllm_serve then exits)."""
        import os

        os.killpg(self.server_pid(), signal.SIGKILL)

    def restart(self) -> None:
        self.stop(expect_clean=False)
        self.start()

    def stop(self, expect_clean: bool = True) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        out = self.log.read_text()
        if expect_clean:
            assert code == 0 and "vLLM server stopped" in out, out[-2000:]
        self.proc = None


def skip_without_vllm(reason: str) -> None:
    """Skip a test that needs the vLLM venv, or fail it where it must run (PURETUNE_REQUIRE_VLLM=1: CI)."""
    if os.environ.get("PURETUNE_REQUIRE_VLLM") == "1":
        pytest.fail(f"PURETUNE_REQUIRE_VLLM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    from backends.rollout.vllm_server import SETUP_HINT, VLLM_VENV, VllmServerError

    if not (VLLM_VENV / "bin" / "python").is_file():
        skip_without_vllm(f"no vLLM venv ({VLLM_VENV}); create it with `{SETUP_HINT}`")
    from backends.hf import load_tokenizer, save_pretrained
    from pure import rng
    from pure.models import init
    from tests.tiny import vllm_tiny

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = vllm_tiny(tokenizer)
    root = tmp_path_factory.mktemp("vllm")
    params = init(config, rng.key(0))
    save_pretrained(params, config, tokenizer, root / "model")
    server = VllmServer(root, root / "model", config, params, tokenizer)
    server.start()
    try:
        yield server
    finally:
        port = server.port
        server.stop(expect_clean=server.starts == 1)
        with pytest.raises(VllmServerError):  # the server and its children are gone
            server.engine(timeout=2)
        assert port

"""Measure token log-prob implementations: forward+backward time and peak memory (not a test).

    python tests/kernels/bench_linear_ce.py [--tokens 512 2048 8192] [--chunks 256 512 1024 2048]

Times are the best of `--reps` calls, wall clock and process CPU time (all threads; steadier than
wall clock on a shared machine). Each (implementation, N, head) runs in a fresh subprocess, so the
peak resident set size (`ru_maxrss`) minus the resident size after building the inputs is that
call's own peak memory.
Shapes are SmolLM2-135M's head: D = 576, V = 49152, float32. `head=frozen` is the LoRA case
(only dL/dhidden), `head=trained` also needs dL/dW.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

D, V = 576, 49152


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(impl: str, chunk: int, n: int, head: str, reps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from kernels.linear_ce import chunked_token_logprobs
    from pure.linear_ce import reference_token_logprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, D, generator=gen).requires_grad_(True)
    weight = torch.randn(V, D, generator=gen).mul_(0.05).requires_grad_(head == "trained")
    targets = torch.randint(0, V, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    fn = reference_token_logprobs if impl == "reference" else (
        lambda h, w, t: chunked_token_logprobs(h, w, t, chunk_size=chunk))
    # Page in the BLAS and autograd code on a tiny call first, so the peak counts only tensors.
    tiny = hidden[:2].detach().requires_grad_(True)
    (fn(tiny, weight, targets[:2]).logprobs.sum()).backward()
    weight.grad = None  # so the peak includes the [V, D] weight gradient each call allocates
    base = rss_bytes()
    times, cpu_times = [], []
    for _ in range(reps):
        hidden.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        (fn(hidden, weight, targets).logprobs * upstream).sum().backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "chunk": chunk, "tokens": n, "head": head, "best_s": min(times), "cpu_s": min(cpu_times),
            "peak_mib": (peak - base) / 2**20, "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--heads", nargs="+", default=["frozen", "trained"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, chunk, n, head = args.one
        print(json.dumps(measure(impl, int(chunk), int(n), head, args.reps, args.threads)))
        return
    for head in args.heads:
        for n in args.tokens:
            for impl, chunk in [("reference", 0)] + [("chunked", c) for c in args.chunks]:
                command = [sys.executable, __file__, "--reps", str(args.reps), "--threads", str(args.threads),
                           "--one", impl, str(chunk), str(n), head]
                row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                print(f"{row['head']:7s} N={row['tokens']:5d} {row['impl']:9s} chunk={row['chunk']:5d} "
                      f"threads {row['threads']} wall {row['best_s'] * 1000:8.1f} ms  "
                      f"cpu {row['cpu_s'] * 1000:8.1f} ms  peak {row['peak_mib']:8.1f} MiB", flush=True)


if __name__ == "__main__":
    main()

"""Data-pipeline throughput numbers (not a test; pytest does not collect it).

    python tests/pure/data/bench_data_pipeline.py [--rows 20000] [--lengths 1000000]

Prints: alpaca and chat_template preparation of synthetic rows with dataset_num_proc 1 and 2 (rows/s,
through `prepare_datasets` without the cache write), seconds to pack 1M lengths, packing efficiency
of the shipped example data at sequence_len 2048 (with the shipped SFT config's template) and of a
larger generated set, and the micro-batch rate of the same data streamed. Timings are wall-clock on
whatever else the machine runs (the load average is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from backends.datasets import prepare_datasets  # noqa: E402
from backends.hf import load_tokenizer  # noqa: E402
from backends.tokenizer import prepare_tokenizer  # noqa: E402
from programs.config import load_config, validate  # noqa: E402
from programs.data import data_spec, tokenizer_edits  # noqa: E402
from pure.data.packing import pack_first_fit_decreasing, packing_efficiency  # noqa: E402

WORDS = "the a model data train token answer question number value result first second list".split()


def sentence(rand: random.Random, n: int) -> str:
    return " ".join(rand.choice(WORDS) for _ in range(n)).capitalize() + "."


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rand = random.Random(seed)
    return [{"instruction": sentence(rand, rand.randint(5, 30)), "input": sentence(rand, rand.randint(0, 40)) if i % 2 else "",
             "output": sentence(rand, rand.randint(10, 120))} for i in range(n)]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rand = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = rand.randint(1, 3)
        messages = []
        for _ in range(turns):
            messages.append({"role": "user", "content": sentence(rand, rand.randint(5, 40))})
            messages.append({"role": "assistant", "content": sentence(rand, rand.randint(10, 100))})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def time_prepare(tokenizer, path: Path, type_: str, num_proc: int, sequence_len: int = 2048) -> tuple[float, int]:
    config = validate({"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "sequence_len": sequence_len,
                       "datasets": [{"path": str(path), "type": type_}], "dataset_num_proc": num_proc,
                       "skip_prepare_dataset": True, "shuffle_merged_datasets": False})
    start = time.perf_counter()
    data = prepare_datasets(data_spec(config), tokenizer)
    return time.perf_counter() - start, len(data.train)


def efficiency(lengths, capacity: int = 2048) -> tuple[float, int]:
    bins = pack_first_fit_decreasing(np.asarray(lengths), capacity, seed=0)
    return packing_efficiency(lengths, bins, capacity), len(bins)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--lengths", type=int, default=1_000_000)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    print(f"cpus {os.cpu_count()}, load average before {os.getloadavg()}")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chdir(tmp)
        for type_, rows in (("alpaca", alpaca_rows(args.rows)), ("chat_template", chat_rows(args.rows))):
            path = write_jsonl(tmp / f"{type_}.jsonl", rows)
            for num_proc in (1, 2):
                seconds, n = time_prepare(tokenizer, path, type_, num_proc)
                print(f"{type_:14} {args.rows} rows, dataset_num_proc {num_proc}: {seconds:6.1f} s = "
                      f"{args.rows / seconds:7.0f} rows/s ({n} examples)")

    lengths = np.random.default_rng(0).integers(1, 2049, size=args.lengths)
    start = time.perf_counter()
    bins = pack_first_fit_decreasing(lengths, 2048, seed=0)
    print(f"pack {args.lengths} lengths (uniform 1..2048, capacity 2048): {time.perf_counter() - start:.2f} s, "
          f"efficiency {packing_efficiency(lengths, bins, 2048):.4f}")
    lengths = np.random.default_rng(0).integers(20, 600, size=args.lengths)
    start = time.perf_counter()
    bins = pack_first_fit_decreasing(lengths, 2048, seed=0)
    print(f"pack {args.lengths} lengths (uniform 20..600, capacity 2048): {time.perf_counter() - start:.2f} s, "
          f"efficiency {packing_efficiency(lengths, bins, 2048):.4f}")

    os.chdir(REPO)
    shipped = load_config(str(REPO / "configs/sft-lora-smollm2.yaml"), ["--sequence-len", "2048"])
    prepare_tokenizer(tokenizer, **tokenizer_edits(shipped))
    shipped = validate({**shipped.to_dict(), "skip_prepare_dataset": True})
    data = prepare_datasets(data_spec(shipped), tokenizer)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    eff, n_bins = efficiency(lengths)
    print(f"shipped {shipped.datasets[0].path}: {len(lengths)} examples, {sum(lengths)} tokens "
          f"(mean {np.mean(lengths):.1f}), sequence_len 2048 -> {n_bins} rows, efficiency {eff:.4f}")
    alpaca = validate({**shipped.to_dict(), "datasets": [{"path": "configs/data/conversions_alpaca.jsonl", "type": "alpaca"}],
                       "test_datasets": None})
    lengths = [len(ids) for ids in prepare_datasets(data_spec(alpaca), tokenizer).train["input_ids"]]
    eff, n_bins = efficiency(lengths)
    print(f"shipped configs/data/conversions_alpaca.jsonl: {len(lengths)} examples, {sum(lengths)} tokens "
          f"(mean {np.mean(lengths):.1f}) -> {n_bins} rows, efficiency {eff:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        big = write_jsonl(Path(tmp) / "chats.jsonl", chat_rows(args.rows, seed=1))
        config = validate({**shipped.to_dict(), "datasets": [{"path": str(big), "type": "chat_template"}],
                           "test_datasets": None})
        lengths = [len(ids) for ids in prepare_datasets(data_spec(config), tokenizer).train["input_ids"]]
        eff, n_bins = efficiency(lengths)
        print(f"generated chats: {len(lengths)} examples (mean {np.mean(lengths):.1f} tokens) -> {n_bins} rows, "
              f"efficiency {eff:.4f}")
        from backends.streaming import stream_micro_batches

        streamed = validate({**config.to_dict(), "streaming": True, "max_steps": 10, "micro_batch_size": 1})
        start = time.perf_counter()
        batches = list(stream_micro_batches(data_spec(streamed), tokenizer, 0))
        seconds = time.perf_counter() - start
        used = sum(b["num_tokens"] for b in batches)
        print(f"streamed the same chats (buffer {streamed.streaming_multipack_buffer_size}): {len(batches)} rows in "
              f"{seconds:.1f} s ({args.rows / seconds:.0f} rows/s), efficiency {used / (len(batches) * 2048):.4f}")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()

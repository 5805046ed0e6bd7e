"""A short benchmark run of ours and both baseline variants emits every report field, and the
hf-packed variant trains on exactly our batches."""
import json

from programs.bench.__main__ import markdown_table
from programs.bench.throughput import run_bench


def test_bench_runs_ours_and_the_hf_baseline_and_reports_every_field(bench_config):
    report = run_bench(bench_config, None, steps=2, baseline_steps=1, warmup=0, baseline="hf", repeats=1,
                       isolate=False, peak_size=256, log=lambda line: None)
    assert set(report["variants"]) == {"ours", "hf-padded", "hf-packed"}
    fields = {"trained_tokens_per_s", "supervised_tokens_per_s", "step_time_median_s", "step_time_iqr_s",
              "peak_memory_mb", "slot_efficiency", "flops_per_s", "fraction_of_peak", "ours_over_this_tokens_per_s",
              "ours_over_this_peak_memory", "first_step_loss"}
    for name, r in report["variants"].items():
        assert fields <= set(r), name
        assert r["measured_steps"] == (2 if name == "ours" else 1), name
        assert r["trained_tokens_per_s"] > 0 and r["supervised_tokens_per_s"] > 0 and r["fraction_of_peak"] > 0, name
    ours, padded, packed = (report["variants"][v] for v in ("ours", "hf-padded", "hf-packed"))
    assert ours["ours_over_this_tokens_per_s"] == 1.0
    # The same packed batches: the same tokens, loss terms and (B = 0 at step 1) first loss.
    first = ours["runs"][0]["steps"][0]
    assert (first["tokens"], first["supervised"]) == (packed["total_tokens"], packed["total_supervised"])
    assert abs(ours["first_step_loss"] - packed["first_step_loss"]) <= 1e-5  # fp32, op order only
    assert padded["slot_efficiency"] < 1.0 and ours["slot_efficiency"] > padded["slot_efficiency"]
    assert 0 < report["packing_efficiency"] <= 1 and report["flop_formula"].startswith("F = ")
    json.dumps(report, default=str)
    table = markdown_table(report)
    assert table.count("\n| ") >= 3 and "hf-padded" in table and "packing efficiency" in table

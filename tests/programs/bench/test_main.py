"""The command line: the program's options in every form parse_cli passes them on, errors that name
the option, and a real run (ours in its own child process) that writes the report and prints the table."""
import json

import pytest

from programs.bench import BenchError
from programs.bench.__main__ import OPTIONS, SUITE_OPTIONS, main, read_options


def test_options_are_read_in_every_form_and_default_otherwise():
    options = read_options(["--steps", "3", "--warmup=1", "--in_process", "--baseline", "hf"], OPTIONS)
    assert (options["steps"], options["warmup"], options["in_process"], options["baseline"]) == (3, 1, True, "hf")
    assert (options["repeats"], options["out"], options["child"]) == (2, None, None)
    suite = read_options(["--suite", "gpu", "--budget-s", "90"], SUITE_OPTIONS)
    assert suite == {"suite": "gpu", "out": "gpu_suite.json", "budget_s": 90.0}


@pytest.mark.parametrize("args, message", [(["--step", "3"], "unknown option '--step'"),
                                           (["--steps", "three"], "--steps expects an integer, got 'three'"),
                                           (["--repeats"], "--repeats needs a value")])
def test_a_wrong_option_is_named(args, message):
    with pytest.raises(BenchError, match=message):
        read_options(args, OPTIONS)


def test_the_cli_measures_in_a_child_process_and_writes_the_report(bench_config_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--config", str(bench_config_path), "--steps", "1", "--warmup=0", "--repeats", "1",
                 "--device", "cpu", "--out", str(out), "--learning-rate", "3e-4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["isolated"] and report["order"] == ["ours"] and report["config"]["learning_rate"] == 3e-4
    assert report["variants"]["ours"]["measured_steps"] == 1
    assert printed.startswith("| variant |") and "| ours |" in printed and printed.endswith(f"JSON: {out}\n")

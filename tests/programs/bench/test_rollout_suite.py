"""`--suite rollout`: its options, and one run on the tiny random model (2 new tokens) that writes
the JSON report and prints the table. Not a timing test: it checks the counts and the shape."""
import json
import re

import pytest
import torch

from programs.bench.__main__ import main, read_options, suite_of
from programs.bench.rollout import OPTIONS


def test_rollout_options_are_read_and_default_otherwise():
    options = read_options(["--suite", "rollout", "--prompts", "2", "--n=3", "--max_tokens", "5", "--top-p", "0.9"],
                           OPTIONS)
    assert (options["prompts"], options["n"], options["max_tokens"], options["top_p"]) == (2, 3, 5, 0.9)
    assert (options["model"], options["threads"], options["temperature"], options["top_k"]) == \
        ("smollm2-135m-instruct", 2, 1.0, 0)
    assert suite_of(["--out", "x", "--suite=rollout"]) == "rollout" and suite_of(["--steps", "2"]) is None


@pytest.mark.parametrize("args, message", [(["--suite", "rollout", "--steps", "2"], "unknown option '--steps'"),
                                           (["--suite", "cpu"], "--suite 'cpu' is not known"),
                                           (["--suite", "rollout", "--n", "0"], "--n must be >= 1, got 0"),
                                           (["--suite", "rollout", "--top-p", "0"], r"top_p must be in \(0, 1\]")])
def test_a_wrong_rollout_option_is_named(args, message, capsys):
    with pytest.raises(SystemExit):
        main(args)
    assert re.search(message, capsys.readouterr().err)


def test_the_rollout_suite_writes_the_report_and_prints_the_table(tiny_model, tmp_path, capsys):
    out = tmp_path / "rollout.json"
    threads = torch.get_num_threads()
    assert main(["--suite", "rollout", "--model", str(tiny_model), "--prompts", "2", "--n", "2", "--max-tokens", "2",
                 "--repeats", "1", "--threads", str(threads + 1), "--out", str(out)]) == 0
    # measured at --threads, and the caller's count is back after (it decides the bits of later runs here)
    assert torch.get_num_threads() == threads
    report = json.loads(out.read_text())
    assert report["threads"] == threads + 1
    assert report["suite"] == "rollout" and (report["prompts"], report["n"], report["max_tokens"]) == (2, 2, 2)
    for side in ("native", "transformers"):
        r = report["variants"][side]
        assert 2 <= r["generated_tokens"] <= 2 * 2 * 2 and r["generated_tokens_per_s"] > 0
    assert report["native_over_transformers_tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "| native |" in printed and "| transformers |" in printed and "native / transformers tok/s" in printed

"""The eval harness end to end on the shipped test-world family (models/family)."""

import json
import math
from pathlib import Path

import pytest

from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair
from cospec_local.config import GenerationConfig
from cospec_local.lab.evaluate import evaluate
from cospec_local.lab.testworld.tasks import TASK_STOP
from cospec_local.lab.stats import wilson_interval
from cospec_local.lab.testworld.tasks import problems

FAMILY = Path(__file__).resolve().parents[1] / "models" / "family"


def test_wilson_interval():
    """Textbook values of the 95% Wilson score interval (z = 1.96), including the edges 0/n and
    n/n where the normal-approximation interval would collapse to a point."""
    cases = {
        (8, 10): (0.4902, 0.9433),
        (1, 10): (0.0179, 0.4042),
        (0, 10): (0.0, 0.2775),
        (10, 10): (0.7225, 1.0),
        (50, 100): (0.4038, 0.5962),
    }
    for (k, n), (lo, hi) in cases.items():
        got = wilson_interval(k, n)
        assert got == pytest.approx((lo, hi), abs=1e-4), (k, n, got)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_mirrors_and_narrows():
    """The interval of k failures is the mirror image of the interval of k successes, and for a
    fixed proportion its width halves (to within a few percent) when n grows four-fold, tending to
    the normal half-width 1.96 * sqrt(p (1 - p) / n) on each side."""
    for k, n in [(0, 7), (2, 9), (3, 20), (37, 50)]:
        lo, hi = wilson_interval(k, n)
        mlo, mhi = wilson_interval(n - k, n)
        assert lo == pytest.approx(1 - mhi, abs=1e-12) and hi == pytest.approx(1 - mlo, abs=1e-12)
    widths = [(lambda lo_hi: lo_hi[1] - lo_hi[0])(wilson_interval(n // 4, n)) for n in (100, 400, 1600, 6400)]
    for wide, narrow in zip(widths, widths[1:]):
        assert 0.49 < narrow / wide < 0.52
    assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(0.25 * 0.75 / 6400), rel=1e-3)


def test_eval_api_speculative_greedy_scores_like_the_target():
    """Greedy speculative decoding is lossless, so on the shipped family it must get exactly the
    same problems right as the target; the report's accuracy and interval come from its counts."""
    with load_pair(FAMILY / "draft.gguf", FAMILY / "target.gguf", n_ctx=512, n_threads=1) as pair:
        # The model draft's acceptance is the premise checked below (the default proposer chain's
        # share of n-gram proposals, and so its acceptance, follows timings).
        config = GenerationConfig(temperature=0.0, max_tokens=160, stop=TASK_STOP, draft_source="model")
        report = evaluate(pair, problems("add", "eval", 25), modes=("target", "draft", "spec"), config=config, progress=False)
    by_mode = {m["mode"]: m for m in report["modes"]}
    # Lossless: the same problems right and wrong as the target alone.
    assert by_mode["spec"]["per_problem"] == by_mode["target"]["per_problem"]
    assert by_mode["target"]["accuracy"] > 0.5
    assert by_mode["spec"]["acceptance_rate"] > 0.5
    # Each mode's summary is computed from its own per-problem verdicts.
    for m in report["modes"]:
        assert m["n"] == 25 == len(m["per_problem"])
        assert m["correct"] == sum(m["per_problem"])
        assert m["accuracy"] == m["correct"] / 25
        assert m["ci95"] == list(wilson_interval(m["correct"], 25))


def test_eval_cli_with_family_and_jsonl(tmp_path):
    """`eval` on a task family and on a JSONL file of problems: the saved report has the requested
    modes, speculative greedy scores problem by problem like the target, and the JSONL run scores
    exactly as the Python API does on the same problems."""
    out = tmp_path / "eval.json"
    args = ["--draft", FAMILY / "draft.gguf", "--target", FAMILY / "target.gguf", "--ctx-size", 512, "--threads", 1]
    r = CliRunner().invoke(cli, ["eval", *map(str, args), "--family", "count", "-n", 10, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "spec" in r.output
    report = json.loads(out.read_text())
    assert [m["mode"] for m in report["modes"]] == ["target", "draft", "spec"]
    assert all(m["n"] == 10 for m in report["modes"])
    by_mode = {m["mode"]: m for m in report["modes"]}
    assert by_mode["spec"]["per_problem"] == by_mode["target"]["per_problem"]

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer, "family": "add"}) + "\n" for p in problems("add", "eval", 5)))
    out2 = tmp_path / "eval_tasks.json"
    r = CliRunner().invoke(cli, ["eval", *map(str, args), "--tasks", str(tasks), "--modes", "target", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    (cli_target,) = json.loads(out2.read_text())["modes"]
    with load_pair(FAMILY / "draft.gguf", FAMILY / "target.gguf", n_ctx=512, n_threads=1) as pair:
        (api_target,) = evaluate(pair, problems("add", "eval", 5), modes=("target",), progress=False)["modes"]
    assert cli_target["mode"] == "target"
    assert cli_target["per_problem"] == api_target["per_problem"]
    assert cli_target["tokens"] == api_target["tokens"]


def test_eval_cli_needs_exactly_one_problem_source():
    """Neither --family nor --tasks: a usage error, not a silent empty run."""
    r = CliRunner().invoke(cli, ["eval", "--target", str(FAMILY / "target.gguf")])
    assert r.exit_code != 0 and "exactly one" in r.output

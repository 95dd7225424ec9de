"""The eval harness end to end on the shipped test-world family (models/family)."""

import json
from pathlib import Path

from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair
from cospec_local.evaluate import evaluate, wilson_interval
from cospec_local.testworld.tasks import problems

FAMILY = Path(__file__).resolve().parents[1] / "models" / "family"


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert 0.49 < lo < 0.5 and 0.94 < hi < 0.95  # textbook values 0.490, 0.943
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_eval_api_speculative_greedy_scores_like_the_target():
    with load_pair(FAMILY / "draft.gguf", FAMILY / "target.gguf", n_ctx=512, n_threads=1) as pair:
        report = evaluate(pair, problems("add", "eval", 25), modes=("target", "draft", "spec"), progress=False)
    by_mode = {m["mode"]: m for m in report["modes"]}
    # Lossless: the same problems right and wrong as the target alone.
    assert by_mode["spec"]["per_problem"] == by_mode["target"]["per_problem"]
    assert by_mode["target"]["accuracy"] > 0.5
    assert by_mode["spec"]["acceptance_rate"] > 0.5
    lo, hi = by_mode["target"]["ci95"]
    assert lo <= by_mode["target"]["accuracy"] <= hi


def test_eval_cli_with_family_and_jsonl(tmp_path):
    out = tmp_path / "eval.json"
    args = ["--draft", FAMILY / "draft.gguf", "--target", FAMILY / "target.gguf", "--ctx-size", 512, "--threads", 1]
    r = CliRunner().invoke(cli, ["eval", *map(str, args), "--family", "count", "-n", 10, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "spec" in r.output
    report = json.loads(out.read_text())
    assert [m["mode"] for m in report["modes"]] == ["target", "draft", "spec"]
    assert all(m["n"] == 10 for m in report["modes"])

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer, "family": "add"}) + "\n" for p in problems("add", "eval", 5)))
    r = CliRunner().invoke(cli, ["eval", *map(str, args), "--tasks", str(tasks), "--modes", "target"])
    assert r.exit_code == 0, r.output
    assert "target" in r.output


def test_eval_cli_needs_exactly_one_problem_source():
    r = CliRunner().invoke(cli, ["eval", "--target", str(FAMILY / "target.gguf")])
    assert r.exit_code != 0 and "exactly one" in r.output

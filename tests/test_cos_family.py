"""CoS modes on the shipped test-world models: greedy output of every fast mode equals `collab`
(2 models, WE and CD; 3 models with the counter), APF with gamma = 1 never costs more model calls
than collab, and the command line runs the collaborative modes."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair
from cospec_local.lab.testworld.tasks import TASK_STOP
from cospec_local.lab.testworld.tasks import problems

FAMILY = Path(__file__).resolve().parents[1] / "models" / "family"
DRAFT, TARGET, COUNTER = (str(FAMILY / f"{name}.gguf") for name in ("draft", "target", "counter"))
PROMPTS = [p.prompt for family in ("add", "count") for p in problems(family, "eval", 6, start=500)]


@pytest.fixture(scope="module")
def pair2():
    with load_pair(DRAFT, TARGET, n_ctx=512, n_threads=1) as pair:
        yield pair


@pytest.fixture(scope="module")
def pair3():
    with load_pair(DRAFT, TARGET, models=(COUNTER,), n_ctx=512, n_threads=1) as pair:
        yield pair


def greedy(pair, prompt, **kw):
    return pair.generate(prompt, temperature=0, max_tokens=120, stop=TASK_STOP, **kw)


@pytest.mark.parametrize("combine", ["we", "cd"])
def test_two_model_fast_modes_match_collab(pair2, combine):
    """Greedy cos (APF) and cos-naive write exactly what collaborative decoding of r writes."""
    drafted = 0
    for prompt in PROMPTS:
        reference = greedy(pair2, prompt, mode="collab", combine=combine)
        assert reference.stats.n_drafted == 0 and set(reference.sources) == {"sampled"}
        for mode, gamma in (("cos", None), ("cos", (1, 1)), ("cos", (3, 2)), ("cos-naive", None)):
            out = greedy(pair2, prompt, mode=mode, combine=combine, gamma=gamma)
            assert out.tokens == reference.tokens, (mode, gamma, prompt)
            drafted += out.stats.n_drafted
    assert drafted > 0


def test_contrastive_decoding_differs_from_the_target_alone(pair2):
    """CD with a large mu really changes the output (the combination is not a no-op)."""
    differ = sum(greedy(pair2, p, mode="collab", combine="cd", mu=1.0).tokens != greedy(pair2, p, mode="target").tokens
                 for p in PROMPTS)
    assert differ > 0


def test_three_model_cos_matches_collab(pair3):
    """The n-model queue scheme with the counter as third model: greedy output equals collab."""
    for prompt in PROMPTS:
        reference = greedy(pair3, prompt, mode="collab")
        # Collab: every model scores every token (one more when the last drawn token was EOS).
        n = reference.stats.n_generated
        calls = reference.stats.model_calls
        assert set(calls) == {"draft", "target", "model1"} and len(set(calls.values())) == 1
        assert calls["target"] in (n, n + 1)
        for mode in ("cos", "cos-naive"):
            out = greedy(pair3, prompt, mode=mode)
            assert out.tokens == reference.tokens, (mode, prompt)
            assert set(out.stats.model_calls) == {"draft", "target", "model1"}


def test_apf_with_gamma_one_never_makes_more_calls_than_collab(pair2):
    """With gamma = 1 for both models, APF's model calls for the same output never exceed
    collab's (counted per call by the engine)."""
    for combine in ("we", "cd"):
        calls = reference_calls = 0
        for prompt in PROMPTS:
            reference = greedy(pair2, prompt, mode="collab", combine=combine)
            out = greedy(pair2, prompt, mode="cos", combine=combine, gamma=(1, 1))
            assert out.tokens == reference.tokens
            assert out.stats.total_model_calls <= reference.stats.total_model_calls
            calls += out.stats.total_model_calls
            reference_calls += reference.stats.total_model_calls
        # and on this pair it is far fewer: collab pays one call per model per token
        assert calls < 0.8 * reference_calls, combine


def test_bad_collaborative_settings_fail_before_the_first_event(pair2, pair3):
    with pytest.raises(ValueError, match="exactly two"):
        pair3.stream("Q: 1+2=?\n", mode="collab", combine="cd")
    with pytest.raises(ValueError, match="weights"):
        pair2.stream("Q: 1+2=?\n", mode="collab", weights=(0.2, 0.3, 0.5))
    with pytest.raises(ValueError, match="gamma"):
        pair2.stream("Q: 1+2=?\n", mode="cos", gamma=(2,))
    with load_pair(None, TARGET, n_ctx=512, n_threads=1) as alone:
        with pytest.raises(ValueError, match="several models"):
            alone.stream("Q: 1+2=?\n", mode="cos")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_generate_in_collaborative_modes():
    """`generate --mode cos --model counter.gguf` prints what `--mode collab` prints."""
    prompt = PROMPTS[0]
    common = ["--draft", DRAFT, "--target", TARGET, "--model", COUNTER, "--ctx-size", 512, "--threads", 1,
              "--temperature", 0, "--max-tokens", 60, "--weights", "0.25,0.5,0.25"]
    collab = run("generate", prompt, *common, "--mode", "collab", "--json")
    cos = run("generate", prompt, *common, "--mode", "cos", "--gamma", "4,1,1", "--json")
    assert collab.exit_code == 0, collab.output
    assert cos.exit_code == 0, cos.output
    collab_json, cos_json = json.loads(collab.stdout), json.loads(cos.stdout)
    assert cos_json["text"] == collab_json["text"]
    assert cos_json["stats"]["model_calls_per_token"] < collab_json["stats"]["model_calls_per_token"]
    bad = run("generate", prompt, *common, "--mode", "cos", "--gamma", "4,x")
    assert bad.exit_code != 0 and "comma-separated int" in bad.output


def test_cli_eval_and_bench_compare_collaborative_modes(tmp_path):
    """`eval` reports one entry per mode (cos = collab at T=0); `bench --baseline collab` reports
    wall-time and model-call speedups with the formula's prediction."""
    models = ["--draft", DRAFT, "--target", TARGET, "--ctx-size", 512, "--threads", 1]
    out = tmp_path / "eval.json"
    r = run("eval", *models, "--family", "add", "-n", 8, "--modes", "target,collab,cos,cos-naive", "--out", out)
    assert r.exit_code == 0, r.output
    by_mode = {m["mode"]: m for m in json.loads(out.read_text())["modes"]}
    assert by_mode["cos"]["per_problem"] == by_mode["collab"]["per_problem"] == by_mode["cos-naive"]["per_problem"]
    assert by_mode["cos"]["model_calls_per_token"] < by_mode["collab"]["model_calls_per_token"]
    out = tmp_path / "bench.json"
    r = run("bench", *models, "--family", "count", "--num-prompts", 2, "--repeats", 1, "--baseline", "collab",
            "--modes", "cos,cos-naive", "--combine", "cd", "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"collab", "cos", "cos-naive"}
    for name in ("cos", "cos-naive"):
        m = report["modes"][name]
        assert m["greedy_output_identical_to_collab"] is True
        assert m["calls_speedup"] > 1.0
        assert m["predicted_speedup"] > 0 and m["predicted_speedup_with_verify_cost"] > 0


def test_cli_chat_in_cos_mode_replies_like_collab():
    """`chat --mode cos` (piped) prints the same replies as `chat --mode collab`, and /stats
    reports model calls per token."""
    models = ["--draft", DRAFT, "--target", TARGET, "--ctx-size", 512, "--threads", 1, "--temperature", 0,
              "--max-tokens", 30, "--no-color", "--combine", "cd"]
    lines = "Q: 12+34=?\n/stats\nQ: 7+8=?\n"
    collab = CliRunner().invoke(cli, ["chat", *map(str, models), "--mode", "collab"], input=lines)
    cos = CliRunner().invoke(cli, ["chat", *map(str, models), "--mode", "cos"], input=lines)
    assert collab.exit_code == 0 and cos.exit_code == 0, cos.output
    assert cos.stdout == collab.stdout and cos.stdout.count("\n") >= 2
    assert "model calls/token" in cos.stderr


def test_draft_threads_apply_to_the_draft_only():
    r = run("info", "--draft", DRAFT, "--target", TARGET, "--ctx-size", 512, "--threads", 2, "--draft-threads", 1)
    assert r.exit_code == 0, r.output
    target_line, draft_line = (line for line in r.output.splitlines() if "threads" in line)
    assert target_line.endswith("2 threads") and draft_line.endswith("1 threads")

"""The command line, through click's CliRunner, on tiny models."""

import json

from click.testing import CliRunner

from cli.main import cli


def run(*args, input=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    return result


def models(draft, target):
    return ["--draft", draft, "--target", target, "--ctx-size", 512, "--threads", 1]


def test_generate_prints_only_the_completion(tiny_target, tiny_other):
    spec = run("generate", "the cat", *models(tiny_other, tiny_target), "--temperature", 0, "--max-tokens", 20)
    assert spec.exit_code == 0, spec.output
    base = run("generate", "the cat", "--target", tiny_target, "--ctx-size", 512, "--threads", 1,
               "--mode", "target", "--temperature", 0, "--max-tokens", 20)
    assert base.exit_code == 0, base.output
    # stdout carries the completion; CliRunner mixes in stderr, where the stats line goes.
    assert spec.stdout == base.stdout
    assert "tok/s" in spec.stderr and "tok/s" not in spec.stdout


def test_generate_json(tiny_target):
    r = run("generate", "hello", *models(tiny_target, tiny_target), "--temperature", 0, "--max-tokens", 10, "--json", "-k", 3)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["stats"]["n_generated"] == 10
    assert data["stats"]["acceptance_rate"] == 1.0
    assert data["finish_reason"] == "length"


def test_generate_reads_prompt_file_from_stdin(tiny_target):
    r = run("generate", "--prompt-file", "-", *models(tiny_target, tiny_target), "--temperature", 0, "--max-tokens", 5, input="the dog")
    assert r.exit_code == 0, r.output
    assert len(r.stdout) > 1


def test_chat_with_piped_stdin(tiny_target, tiny_other):
    r = run("chat", *models(tiny_other, tiny_target), "--temperature", 0, "--max-tokens", 15, "--no-color",
            input="hello there\n/stats\nsecond question\n/reset\nthird\n")
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr  # /stats
    assert "(conversation reset)" in r.stderr
    assert r.stdout.count("\n") >= 3  # three replies


def test_chat_replies_match_target_only(tiny_target, tiny_other):
    lines = "what is this\nand that\n"
    spec = run("chat", *models(tiny_other, tiny_target), "--temperature", 0, "--max-tokens", 20, "--no-color", input=lines)
    base = run("chat", "--target", tiny_target, "--ctx-size", 512, "--threads", 1, "--mode", "target",
               "--temperature", 0, "--max-tokens", 20, "--no-color", input=lines)
    assert spec.exit_code == 0 and base.exit_code == 0
    assert spec.stdout == base.stdout


def test_chat_colours_draft_tokens(tiny_target):
    r = run("chat", *models(tiny_target, tiny_target), "--temperature", 0, "--max-tokens", 15, "--color", input="hi\n")
    assert r.exit_code == 0, r.output
    assert "\x1b[32m" in r.stdout


def test_info_reports_the_pair(tiny_target, tiny_other):
    r = run("info", *models(tiny_other, tiny_target))
    assert r.exit_code == 0, r.output
    assert "identical vocabularies" in r.output and "SPM" in r.output


def test_make_draft_command(tmp_path, tiny_target):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc abc abd\n\nhello there\n")
    out = tmp_path / "d.gguf"
    r = run("make-draft", tiny_target, "-o", out, "--vocab-size", 6, "--corpus", corpus)
    assert r.exit_code == 0, r.output
    assert out.exists() and "6 frequent" in r.output
    info = run("info", *models(out, tiny_target))
    assert "trimmed draft vocabulary" in info.output


def test_clear_errors_for_bad_files(tmp_path, tiny_target):
    r = run("generate", "x", "--draft", tmp_path / "missing.gguf", "--target", tiny_target)
    assert r.exit_code == 1 and "model file not found" in r.output
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    r = run("generate", "x", "--draft", junk, "--target", tiny_target)
    assert r.exit_code == 1 and "not a GGUF" in r.output
    assert "Traceback" not in r.output


def test_incompatible_pair_is_reported(tiny_target, tiny_small_vocab):
    r = run("generate", "x", *models(tiny_small_vocab, tiny_target))
    assert r.exit_code == 1 and "vocabulary sizes differ" in r.output


def test_context_overflow_is_reported(tiny_target):
    r = run("generate", "a" * 600, *models(tiny_target, tiny_target))
    assert r.exit_code == 1 and "context" in r.output


def test_bench_command(tmp_path, tiny_target, tiny_other):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    r = run("bench", *models(tiny_other, tiny_target), "--max-tokens", 16, "--repeats", 1, "--sweep-k", "1,2", "--out", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"target", "spec", "spec_k1", "spec_k2"}
    assert report["modes"]["spec_k2"]["greedy_output_identical_to_target"] is True
    assert 0 < report["costs"]["c"]
    for name in ("spec_k1", "spec_k2"):
        m = report["modes"][name]
        assert m["ceiling_free_draft"] >= m["predicted_speedup_with_verify_cost"] > 0


def test_speedup_formulas():
    from cospec_local.bench import predicted_speedup, predicted_speedup_with_verify_cost, verify_ratio

    assert predicted_speedup(1.0, 4, 0.0) == 5.0  # every draft token accepted, free draft
    assert predicted_speedup(0.0, 4, 0.25) == 0.5  # nothing accepted: one token for 2 call-times
    # With verification costing exactly one call, both formulas agree.
    assert abs(predicted_speedup(0.8, 3, 0.2) - predicted_speedup_with_verify_cost(0.8, 3, 0.2, 1.0)) < 1e-12
    # 4 expected tokens (alpha 1, gamma 3) for a free draft and a 2-call verification: 2x.
    assert predicted_speedup_with_verify_cost(1.0, 3, 0.0, 2.0) == 2.0
    costs = {"target_call_ms": 10.0, "verify_ms_by_rows": {"1": 10.0, "3": 20.0}}
    assert verify_ratio(costs, 2) == 1.5  # interpolated between the measured row counts


def test_chat_survives_ctrl_c_during_a_reply(tiny_target, monkeypatch):
    from cospec_local.api import ChatSession

    real_send = ChatSession.send
    calls = {"n": 0}

    def send(self, text, config=None, **kw):
        calls["n"] += 1
        for i, event in enumerate(real_send(self, text, config, **kw)):
            if calls["n"] == 1 and i == 3:
                raise KeyboardInterrupt  # what Ctrl-C does in the middle of the first reply
            yield event

    monkeypatch.setattr(ChatSession, "send", send)
    r = run("chat", *models(tiny_target, tiny_target), "--temperature", 0, "--max-tokens", 10, "--no-color", input="first\nsecond\n")
    assert r.exit_code == 0, r.output
    assert "(interrupted)" in r.stderr
    assert calls["n"] == 2  # the session went on to the second message

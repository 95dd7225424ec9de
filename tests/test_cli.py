"""The command line, through click's CliRunner, on tiny models."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "models" / "family"


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
    """--json prints one object whose text is what plain `generate` prints, with the stats of the
    run (a draft identical to the target accepts every token)."""
    r = run("generate", "hello", *models(tiny_target, tiny_target), "--temperature", 0, "--max-tokens", 10, "--json", "-k", 3,
            "--draft-source", "model")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["stats"]["n_generated"] == 10
    assert data["stats"]["acceptance_rate"] == 1.0
    assert data["finish_reason"] == "length"
    plain = run("generate", "hello", *models(tiny_target, tiny_target), "--temperature", 0, "--max-tokens", 10, "-k", 3)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == data["text"] + "\n"


def test_generate_reads_prompt_file_from_stdin(tmp_path):
    """A prompt read from stdin ('--prompt-file -') or from a file (trailing newline included) gives
    exactly the completion of the same prompt passed as an argument, which is the library's greedy
    completion of it (the shipped family's target answers an addition problem)."""
    prompt = "Q: 12+34=?\n"
    opts = [*models(FAMILY / "draft.gguf", FAMILY / "target.gguf"), "--temperature", 0, "--max-tokens", 40]
    ref = run("generate", prompt, *opts)
    assert ref.exit_code == 0, ref.output
    with load_pair(None, FAMILY / "target.gguf", n_ctx=512, n_threads=1) as pair:
        expected = pair.generate(prompt, temperature=0, mode="target", max_tokens=40).text
    assert "ANSWER: 46" in expected and ref.stdout == expected + "\n"
    piped = run("generate", "--prompt-file", "-", *opts, input=prompt)
    assert piped.exit_code == 0, piped.output
    assert piped.stdout == ref.stdout
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt)
    from_file = run("generate", "--prompt-file", prompt_file, *opts)
    assert from_file.exit_code == 0, from_file.output
    assert from_file.stdout == ref.stdout


def chat_replies(target, turns, max_tokens):
    """Greedy target-only replies of a ChatSession to `turns`; None in `turns` resets the chat."""
    with load_pair(None, target, n_ctx=512, n_threads=1) as pair:
        chat, replies = pair.chat(), []
        for message in turns:
            if message is None:
                chat.reset()
            else:
                replies.append(chat.say(message, temperature=0, max_tokens=max_tokens, mode="target").text)
    return replies


def test_chat_with_piped_stdin():
    """Piped chat: commands go to stderr, and stdout holds exactly the three replies a ChatSession
    gives, one per line: the second continues the first turn, the third starts afresh after /reset
    (the shipped family's replies depend on the history, so a missed reset or a lost turn shows)."""
    family = models(FAMILY / "draft.gguf", FAMILY / "target.gguf")
    r = run("chat", *family, "--temperature", 0, "--max-tokens", 15, "--no-color",
            input="hello there\n/stats\nsecond question\n/reset\nthird\n")
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr  # /stats
    assert "(conversation reset)" in r.stderr
    replies = chat_replies(FAMILY / "target.gguf", ["hello there", "second question", None, "third"], 15)
    # The CLI drops the reply's leading whitespace (the space after "Assistant:").
    assert r.stdout == "".join(reply.lstrip() + "\n" for reply in replies)
    # The reference itself tells a continued conversation from a fresh one.
    assert chat_replies(FAMILY / "target.gguf", ["hello there", "second question", "third"], 15)[2] != replies[2]
    assert chat_replies(FAMILY / "target.gguf", ["second question"], 15)[0] != replies[1]


def test_chat_replies_match_target_only(tiny_target, tiny_other):
    lines = "what is this\nand that\n"
    spec = run("chat", *models(tiny_other, tiny_target), "--temperature", 0, "--max-tokens", 20, "--no-color", input=lines)
    base = run("chat", "--target", tiny_target, "--ctx-size", 512, "--threads", 1, "--mode", "target",
               "--temperature", 0, "--max-tokens", 20, "--no-color", input=lines)
    assert spec.exit_code == 0 and base.exit_code == 0
    assert spec.stdout == base.stdout


def test_chat_colours_draft_tokens():
    """--color wraps draft-accepted tokens in green and leaves the target's own tokens plain; with
    the colour codes removed the reply is exactly the --no-color reply."""
    family = models(FAMILY / "draft.gguf", FAMILY / "target.gguf")
    r = run("chat", *family, "--temperature", 0, "--max-tokens", 40, "--color", input="Q: 57+68=?\n")
    assert r.exit_code == 0, r.output
    assert "\x1b[32m" in r.stdout
    plain_runs = [part for part in re.split(r"\x1b\[32m.*?\x1b\[0m", r.stdout.strip(), flags=re.S) if part]
    assert plain_runs, "no token came from the target: the colouring is not per source"
    plain = run("chat", *family, "--temperature", 0, "--max-tokens", 40, "--no-color", input="Q: 57+68=?\n")
    assert plain.exit_code == 0, plain.output
    assert "\x1b[" not in plain.stdout
    assert re.sub(r"\x1b\[[0-9;]*m", "", r.stdout) == plain.stdout


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
    """`bench` writes its JSON report and plot; the report's predictions are the formulas applied
    to its own measured costs and acceptance, and greedy speculative output equals the target's."""
    from cospec_local.lab.bench import verify_ratio
    from cospec_local.speedup import predicted_speedup, predicted_speedup_with_verify_cost

    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    r = run("bench", *models(tiny_other, tiny_target), "--max-tokens", 16, "--repeats", 1, "--sweep-k", "1,2", "--out", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"target", "spec", "spec_k1", "spec_k2"}
    assert report["modes"]["spec_k2"]["greedy_output_identical_to_target"] is True
    # The report's derived numbers follow from its measurements by the documented formulas (any
    # c >= 0 would satisfy "ceiling >= prediction > 0"; these can fail).
    costs = report["costs"]
    assert costs["c"] == pytest.approx(costs["draft_call_ms"] / costs["target_call_ms"], rel=1e-12)
    assert costs["verify_ms_by_rows"]["1"] > 0 and costs["draft_call_ms"] > 0
    for name in ("spec", "spec_k1", "spec_k2"):
        m = report["modes"][name]
        alpha, gamma = m["alpha"], m["mean_draft_length"]
        assert 0 <= alpha <= 1 and m["cycles"] > 0
        ratio = verify_ratio(costs, gamma + 1)
        assert m["predicted_speedup"] == pytest.approx(predicted_speedup(alpha, gamma, costs["c"]), rel=1e-9)
        assert m["predicted_speedup_with_verify_cost"] == pytest.approx(
            predicted_speedup_with_verify_cost(alpha, gamma, costs["c"], ratio), rel=1e-9)
        assert m["ceiling_free_draft"] == pytest.approx(predicted_speedup_with_verify_cost(alpha, gamma, 0.0, ratio), rel=1e-9)
        assert m["achieved_over_predicted"] == pytest.approx(m["speedup_median"] / m["predicted_speedup"], rel=1e-9)
    # A fixed-k run never drafts more than k per cycle.
    assert 0 < report["modes"]["spec_k1"]["mean_draft_length"] <= 1
    assert 0 < report["modes"]["spec_k2"]["mean_draft_length"] <= 2


def test_speedup_formulas():
    """The speedup formulas against hand-computed values."""
    from cospec_local.lab.bench import verify_ratio
    from cospec_local.speedup import predicted_speedup, predicted_speedup_with_verify_cost

    assert predicted_speedup(1.0, 4, 0.0) == 5.0  # every draft token accepted, free draft
    assert predicted_speedup(0.0, 4, 0.25) == 0.5  # nothing accepted: one token for 2 call-times
    # With verification costing exactly one call, both formulas agree.
    assert abs(predicted_speedup(0.8, 3, 0.2) - predicted_speedup_with_verify_cost(0.8, 3, 0.2, 1.0)) < 1e-12
    # 4 expected tokens (alpha 1, gamma 3) for a free draft and a 2-call verification: 2x.
    assert predicted_speedup_with_verify_cost(1.0, 3, 0.0, 2.0) == 2.0
    costs = {"target_call_ms": 10.0, "verify_ms_by_rows": {"1": 10.0, "3": 20.0}}
    assert verify_ratio(costs, 2) == 1.5  # interpolated between the measured row counts
    # alpha 0.5, gamma 2: 1 + 0.5 + 0.25 = 1.75 expected tokens; c 0.1: 1.2 call-times per cycle.
    assert predicted_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2, rel=1e-12)
    # The same cycle when verifying 3 rows costs 1.5 calls: 1.75 / (0.2 + 1.5).
    assert predicted_speedup_with_verify_cost(0.5, 2, 0.1, 1.5) == pytest.approx(1.75 / 1.7, rel=1e-12)
    assert verify_ratio(costs, 3) == 2.0 and verify_ratio(costs, 1) == 1.0


def test_chat_survives_ctrl_c_during_a_reply(tiny_target, monkeypatch):
    from cospec_local.api import ChatSession

    real_send = ChatSession.send
    calls = {"n": 0}

    def send(self, text, config=None, grammar=None, **kw):
        calls["n"] += 1
        for i, event in enumerate(real_send(self, text, config, grammar, **kw)):
            if calls["n"] == 1 and i == 3:
                raise KeyboardInterrupt  # what Ctrl-C does in the middle of the first reply
            yield event

    monkeypatch.setattr(ChatSession, "send", send)
    r = run("chat", *models(tiny_target, tiny_target), "--temperature", 0, "--max-tokens", 10, "--no-color", input="first\nsecond\n")
    assert r.exit_code == 0, r.output
    assert "(interrupted)" in r.stderr
    assert calls["n"] == 2  # the session went on to the second message


class Terminal:
    """The controlling side of a pseudo-terminal: what the program wrote (CRLF read as LF), and
    waiting for a text to appear after the last one waited for."""

    def __init__(self, fd):
        import codecs

        self.fd, self.text, self.pos = fd, "", 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def expect(self, text, timeout=120):
        import os
        import select
        import time

        deadline = time.monotonic() + timeout
        while (found := self.text.find(text, self.pos)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} after {self.text[self.pos:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the program closed the terminal
                    data = b""
                assert data, f"the terminal closed before {text!r}; it showed {self.text!r}"
                self.text = (self.text + self.decoder.decode(data)).replace("\r\n", "\n")
        self.pos = found + len(text)


def test_chat_on_a_terminal_ctrl_c_at_the_prompt_clears_the_line():
    """On a terminal, Ctrl-C at the prompt drops the line being typed and prompts afresh, as a shell
    does: the chat goes on and the next reply continues the conversation (the shipped family's
    replies depend on the history); /exit quits with status 0."""
    import os
    import pty
    import subprocess
    import sys
    import time

    first, second = (reply.lstrip() for reply in chat_replies(FAMILY / "target.gguf", ["hello there", "second question"], 15))
    master, slave = pty.openpty()
    # A session of its own whose controlling terminal is the pty: the terminal's Ctrl-C (its
    # line discipline's SIGINT to the foreground group) reaches the chat, as in a shell.
    start = ("import fcntl, runpy, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
             "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'cospec-local'; "
             "runpy.run_module('cli.main', run_name='__main__', alter_sys=True)")
    args = ["chat", *models(FAMILY / "draft.gguf", FAMILY / "target.gguf"), "--temperature", 0, "--max-tokens", 15, "--no-color"]
    proc = subprocess.Popen([sys.executable, "-c", start, *map(str, args)], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    term = Terminal(master)
    try:
        term.expect("/stats /reset /exit\n> ")
        os.write(master, b"hello there\n")
        term.expect("hello there\n" + first + "\n> ")
        time.sleep(0.5)  # the chat is reading the terminal now
        os.write(master, b"forget this")
        term.expect("forget this")
        os.write(master, b"\x03")  # Ctrl-C
        term.expect("\n> ")
        time.sleep(0.5)
        assert proc.poll() is None, term.text
        os.write(master, b"second question\n")
        term.expect("second question\n" + second + "\n> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0, term.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert "(interrupted)" not in term.text and "Traceback" not in term.text


def test_bench_ngram_modes_predict_with_a_free_draft(tmp_path):
    """`bench --modes ngram,ngram+model`: spec mode with those draft sources, greedy output equal
    to the target's, the n-gram prediction made with c = 0, and the plot has every mode."""
    from cospec_local.lab.bench import verify_ratio
    from cospec_local.speedup import predicted_speedup, predicted_speedup_with_verify_cost

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = run("bench", *models(FAMILY / "draft.gguf", FAMILY / "target.gguf"), "--family", "add", "--num-prompts", 2,
            "--modes", "ngram,ngram+model", "--max-tokens", 48, "--repeats", 1, "--out", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"target", "ngram", "ngram+model"}
    costs = report["costs"]
    for name in ("ngram", "ngram+model"):
        assert report["modes"][name]["greedy_output_identical_to_target"] is True
    m = report["modes"]["ngram"]
    assert m["cycles"] > 0
    assert m["predicted_speedup"] == pytest.approx(predicted_speedup(m["alpha"], m["mean_draft_length"], 0.0), rel=1e-9)
    assert m["predicted_speedup_with_verify_cost"] == pytest.approx(
        predicted_speedup_with_verify_cost(m["alpha"], m["mean_draft_length"], 0.0, verify_ratio(costs, m["mean_draft_length"] + 1)),
        rel=1e-9)
    bad = run("bench", "--modes", "ngrams")
    assert bad.exit_code != 0 and "unknown mode" in bad.output

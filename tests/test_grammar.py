"""Constrained decoding (`cospec_local.grammar`): every mode follows the constrained target.

Random-weight models only produce valid JSON because of the grammar, which makes the validity
checks strong: a tiny Qwen3.5-architecture target with the real Qwen3.5 vocabulary and a llama
draft sharing it (`tests/hybrid.py`), and the character-vocabulary tiny llamas for the exact
statistical test."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from cospec_local import Grammar, GrammarError, load_pair
from cospec_local.backend import LlamaModel, LoadOptions
from cospec_local.grammar import GrammarState
from cospec_local.sampling import SamplingParams, logits_to_probs
from hybrid import build_llama_draft, build_qwen35
from stats_util import assert_matches, sampled_counts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "ok", "color", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Give me a JSON object:", "The the the the", "def add(a, b):"]


@pytest.fixture(scope="module")
def qwen_pair_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("grammar")
    return build_llama_draft(d / "draft.gguf", seed=2, tied_output=False, residual_scale=0.3), \
        build_qwen35(d / "target.gguf", seed=2, tied_output=False, residual_scale=0.3)


@pytest.fixture(scope="module")
def qwen_pair(qwen_pair_paths):
    with load_pair(*qwen_pair_paths, n_ctx=512, n_threads=1) as pair:
        yield pair


def test_invalid_schemas_and_grammars_say_what_is_wrong():
    cases = [
        (Grammar.json_schema("{not json"), "not valid JSON"),
        (Grammar.json_schema('{"type": "objekt"}'), "invalid JSON schema"),
        (Grammar.json_schema('{"type": "object", "properties": {"a": {"minLength": "x"}}}'), "properties/a/minLength"),
        (Grammar.json_schema("[1, 2]"), "must be a JSON object"),
        (Grammar.regex("[a-"), "invalid regex"),
        (Grammar.lark("start: foo"), "invalid lark"),
        (Grammar.gbnf('root ::= foo'), "invalid GBNF grammar: Rule 'foo' not found"),
        (Grammar("yaml", "a: b"), "unknown grammar kind"),
    ]
    for grammar, message in cases:
        with pytest.raises(GrammarError, match=message):
            grammar.compile()
    assert Grammar.gbnf('root ::= "yes" | "no"').compile()
    assert Grammar.json_object().compile()


@pytest.mark.parametrize("mode,source", [("target", None), ("spec", "ngram+model"), ("spec", "ngram"), ("cospec", None),
                                         ("cos", None), ("cos-naive", None), ("collab", None), ("draft", None)])
def test_every_completed_output_validates_against_its_schema(qwen_pair, mode, source):
    """Greedy and sampled, several prompts and seeds: a reply that ends (not cut by max_tokens)
    parses and validates; most replies end."""
    grammar = Grammar.json_schema(SCHEMA)
    extra = {"draft_source": source} if source else {}
    done = 0
    for i, prompt in enumerate(PROMPTS):
        for temperature, seed in ((0.0, None), (1.0, i), (1.0, 10 + i)):
            out = qwen_pair.generate(prompt, mode=mode, temperature=temperature, seed=seed, max_tokens=80,
                                     grammar=grammar, **extra)
            assert out.stats.finish_reason in ("stop", "length")
            if out.stats.finish_reason == "stop":
                jsonschema.validate(json.loads(out.text), SCHEMA)
                done += 1
    assert done >= 6


@pytest.mark.parametrize("assist", ["verify", "drafts", "forced"])
@pytest.mark.parametrize("source", ["model", "ngram+model"])
def test_greedy_constrained_spec_equals_constrained_target_only(qwen_pair, assist, source):
    """Whatever the grammar does for the proposals, greedy spec equals greedy target-only under
    the same grammar, token for token; masked drafts never propose a forbidden token, and forced
    tokens cost no model call."""
    grammar = Grammar.json_schema(SCHEMA)
    settings = dict(temperature=0, max_tokens=60, adaptive=False, draft_p_min=0.0, grammar=grammar)
    for prompt in PROMPTS:
        ref = qwen_pair.generate(prompt, mode="target", grammar_assist="verify", **settings)
        for k in (2, 6):
            out = qwen_pair.generate(prompt, mode="spec", draft_source=source, draft_max=k, grammar_assist=assist, **settings)
            assert out.tokens == ref.tokens, (prompt, k)
            s = out.stats
            if assist == "forced":
                assert s.n_forced > 0 and s.model_calls["target"] < s.n_generated
            else:
                assert s.n_forced == 0


def test_forced_tokens_and_masked_drafts_save_calls(qwen_pair):
    """On a schema, forced tokens make fewer target calls than masked verification alone, and
    masked drafts are accepted more often than unmasked ones."""
    grammar = Grammar.json_schema(SCHEMA)
    totals = {}
    for assist in ("verify", "drafts", "forced"):
        calls = accepted = drafted = tokens = 0
        for prompt in PROMPTS:
            out = qwen_pair.generate(prompt, mode="spec", draft_source="model", temperature=0, max_tokens=60,
                                     adaptive=False, draft_max=4, draft_p_min=0.0, grammar=grammar, grammar_assist=assist)
            s = out.stats
            calls, tokens = calls + s.model_calls.get("target", 0), tokens + s.n_generated
            accepted, drafted = accepted + s.n_accepted, drafted + s.n_drafted
        totals[assist] = (calls / tokens, accepted / max(drafted, 1))
    assert totals["drafts"][1] > totals["verify"][1]
    assert totals["forced"][0] < totals["drafts"][0]


def test_sampled_constrained_spec_follows_the_masked_target(tiny_target, tiny_other):
    """The joint law of the first two sampled tokens under a regular expression (a draft that
    often proposes forbidden or rejected tokens) equals the target's masked distribution: chi-square
    over 600 seeds, with the exact law from a fresh target and a fresh grammar state."""
    grammar = Grammar.regex(r"[a-h][a-h0-9 ]*")
    settings = dict(temperature=1.0, top_k=6, top_p=1.0, min_p=0.0)
    params = SamplingParams(**settings)
    with load_pair(tiny_other, tiny_target, n_ctx=256, n_threads=1) as pair:
        prompt = pair.tokenize("hello world")
        tokenizer = pair.target.grammar_tokenizer()
        with LlamaModel(tiny_target, LoadOptions(n_ctx=256, n_threads=1)) as fresh:
            def law(context, emitted):
                fresh.reset()
                row = np.array(fresh.eval(context, 1)[0], dtype=np.float32)
                state = GrammarState(tokenizer, grammar.compile(), fresh.n_vocab)
                state.commit(emitted)
                state.mask_row(row, [], 0)
                return logits_to_probs(row.astype(np.float64), params)

            # Once the regex is satisfied the end of generation is allowed: a one-token reply.
            eog = {int(t) for t in fresh.eog_ids()}
            first = law(prompt, [])
            cells: dict[tuple, float] = {}
            for a in np.flatnonzero(first):
                for b, q in enumerate(law(prompt + [int(a)], [int(a)])):
                    if q > 0:
                        key = (int(a),) if b in eog else (int(a), b)
                        cells[key] = cells.get(key, 0.0) + first[a] * q
        counts, rejected = sampled_counts(
            lambda seed: pair.generate(prompt, mode="spec", draft_source="model", seed=seed, max_tokens=2, adaptive=False,
                                       draft_max=3, grammar=grammar, grammar_assist="verify", **settings), cells, 600)
    assert rejected > 50
    assert_matches(counts, np.array(list(cells.values())))


def test_grammar_state_after_rollbacks_equals_a_fresh_one(qwen_pair):
    """Following pending tokens, rolling back and committing leaves the matcher where a fresh one
    that consumed only the committed tokens is: the same forbidden set, token for token."""
    compiled = Grammar.json_schema(SCHEMA).compile()
    tokenizer = qwen_pair.target.grammar_tokenizer()
    n_vocab = qwen_pair.target.n_vocab
    reply = qwen_pair.target.tokenize('{"name": "ab", "ok": true, "color": "red", "tags": ["a"]}', add_bos=False)
    state = GrammarState(tokenizer, compiled, n_vocab)
    rng = np.random.default_rng(0)
    committed = 0
    while committed < len(reply):
        # Follow a pending run that matches the reply for a while, then diverges (a rejection).
        n_ok = int(rng.integers(0, 4))
        pending = reply[committed:committed + n_ok] + [int(rng.integers(0, n_vocab))]
        for j in range(len(pending) + 1):
            state.forbidden(pending, j)
        n_commit = max(1, min(n_ok, len(reply) - committed))
        state.commit(reply[committed:committed + n_commit])
        committed += n_commit
        fresh = GrammarState(tokenizer, compiled, n_vocab)
        fresh.commit(reply[:committed])
        np.testing.assert_array_equal(state.forbidden([], 0), fresh.forbidden([], 0))
    assert state.is_accepting()


def test_a_reply_cut_by_max_tokens_says_length_and_bad_grammars_fail_before_the_first_token(qwen_pair):
    out = qwen_pair.generate(PROMPTS[0], mode="spec", temperature=0, max_tokens=5, grammar=Grammar.json_schema(SCHEMA))
    assert out.stats.finish_reason == "length" and len(out.tokens) == 5
    with pytest.raises(GrammarError):
        qwen_pair.stream(PROMPTS[0], grammar=Grammar.json_schema('{"type": 3}'))
    # The pair is still usable.
    assert qwen_pair.generate(PROMPTS[0], mode="target", max_tokens=3, grammar=Grammar.regex("[0-9]+")).text.isdigit()


def test_cli_json_schema_and_grammar_files(tmp_path):
    """generate and chat take --json-schema FILE and --grammar FILE; a bad file is one clear error."""
    from click.testing import CliRunner

    from cli.main import cli
    from server_load import FAMILY_MODELS

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.gbnf").write_text('root ::= ("yes" | "no") "."')
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    base = [*FAMILY_MODELS, "--ctx-size", "256", "--threads", "1", "--temperature", "0"]
    out = CliRunner().invoke(cli, ["generate", *base, "--json-schema", str(tmp_path / "s.json"), "--json", "add 1 2"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    jsonschema.validate(json.loads(result["text"]), schema)
    assert result["stats"]["n_forced"] > 0
    out = CliRunner().invoke(cli, ["generate", *base, "--grammar", str(tmp_path / "g.gbnf"), "add 1 2"])
    assert out.exit_code == 0 and out.stdout.strip() in ("yes.", "no.")
    out = CliRunner().invoke(cli, ["chat", *base, "--json-schema", str(tmp_path / "s.json")], input="add 2 3\n")
    assert out.exit_code == 0, out.output
    jsonschema.validate(json.loads(out.stdout.strip().splitlines()[0]), schema)
    out = CliRunner().invoke(cli, ["generate", *base, "--json-schema", str(tmp_path / "bad.json"), "x"])
    assert out.exit_code == 1 and "invalid JSON schema at type" in out.output


@pytest.mark.parametrize("mode,source", [("target", None), ("spec", "ngram+model"), ("spec", "ngram"), ("cospec", None),
                                         ("cos", None)])
def test_the_default_pair_completes_valid_json_in_every_mode(default_pair_paths, mode, source):
    """Gemma 3 270M and its draft under the schema, greedy and sampled: every completed reply
    validates, and greedy spec equals greedy target-only."""
    from cospec_local.lab.bench import JSON_PROMPTS

    grammar = Grammar.json_schema(SCHEMA)
    extra = {"draft_source": source} if source else {}
    with load_pair(*default_pair_paths, n_ctx=512) as pair:
        done = 0
        for i, prompt in enumerate(JSON_PROMPTS[:2]):
            for temperature, seed in ((0.0, None), (1.0, i)):
                out = pair.generate(prompt, mode=mode, temperature=temperature, seed=seed, max_tokens=60,
                                    grammar=grammar, **extra)
                if out.finish_reason == "stop":
                    jsonschema.validate(json.loads(out.text), SCHEMA)
                    done += 1
                if temperature == 0 and mode == "spec":
                    ref = pair.generate(prompt, mode="target", temperature=0, max_tokens=60, grammar=grammar)
                    assert out.tokens == ref.tokens
        assert done >= 3

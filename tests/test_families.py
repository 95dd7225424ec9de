"""Real model families: llama.cpp's own vocabularies and chat templates on tiny random-weight
models (tests/families.py). On each family: llama.cpp's tokenizer test vectors, the pair check,
make-draft, spec and n-gram greedy output token-for-token equal to target-only, chat through the
family's real template with KV reuse; a padded Qwen pair; cross-family pairs and vocab-only files
refused with clear errors; sampled exactness and the server on BPE families."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cospec_local import load_pair
from cospec_local.backend import LlamaModel, LoadOptions, check_gguf_file
from cospec_local.errors import IncompatiblePairError, ModelLoadError
from families import FAMILIES, N_PAD, build_chat_family, build_family, tokenizer_vectors, vocab_path

ROOT = Path(__file__).resolve().parents[1]
CTX = 1024
PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
# A prompt that repeats itself, so prompt-lookup (n-gram) drafts find matches.
REPEATING = "one two three four five six. one two three four five six. one two three"


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    return {name: build_family(family, out / name) for name, family in FAMILIES.items()}


def open_family(models, draft=True, padded=False, **options):
    target = models.padded_target if padded else models.target
    return load_pair(models.draft if draft else None, target, n_ctx=CTX, n_threads=1, **options)


def greedy(pair, prompt, mode, max_tokens=40, **overrides):
    return pair.generate(prompt, mode=mode, temperature=0.0, max_tokens=max_tokens, adaptive=False, draft_max=4, **overrides)


# -- tokenizers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["llama-bpe", "qwen2", "qwen35", "gemma-4", "phi-3", "gpt-2", "deepseek-llm",
                                   "deepseek-coder"])
def test_tokenization_equals_llama_cpps_test_vectors(family_models, tmp_path, vocab):
    """Our tokenizer, on a model carrying the real vocabulary, gives llama.cpp's .out vectors."""
    family = next((f for f in FAMILIES.values() if f.vocab == vocab), None)
    if family is None:  # a vocabulary without a family here: a one-layer model just for its tokenizer
        from families import Family

        family = Family(vocab, vocab, None, None)
        path = build_family(family, tmp_path).target
    else:
        path = family_models[family.name].target
    vectors = tokenizer_vectors(vocab)
    assert len(vectors) >= 10
    with LlamaModel(path, LoadOptions(n_ctx=64, n_threads=1)) as model:
        for text, expected in vectors:
            assert model.tokenize(text, add_bos=False, special=False) == expected, repr(text)


# -- pairs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pair_check_and_greedy_spec_and_ngram_equal_target_only(family_models, name):
    """Per family: the pair is accepted with identical vocabularies, and greedy spec (model draft)
    and n-gram output are token for token target-only's; the draft both agrees and disagrees."""
    with open_family(family_models[name]) as pair:
        assert pair.report is not None and not pair.report.trimmed and not pair.report.padded
        assert pair.report.draft_vocab == pair.report.target_vocab == family_models[name].n_vocab
        reference = greedy(pair, PROMPT, "target")
        assert len(reference.tokens) == 40 or reference.finish_reason == "stop"
        spec = greedy(pair, PROMPT, "spec", draft_source="model")
        assert spec.tokens == reference.tokens
        assert 0 < spec.stats.n_accepted < spec.stats.n_drafted, "the draft must both agree and disagree"
        ref_repeat = greedy(pair, REPEATING, "target")
        ngram = greedy(pair, REPEATING, "spec", draft_source="ngram")
        assert ngram.tokens == ref_repeat.tokens
        assert ngram.stats.n_drafted > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_make_draft_on_each_family_is_lossless(family_models, tmp_path, name):
    """make-draft trims each real vocabulary (BPE ones have merges and often no unknown token); the
    trimmed draft passes the pair check and spec with it is greedy-equal to target-only."""
    from cospec_local.default_pair import corpus_files
    from cospec_local.draft_maker import make_draft

    models = family_models[name]
    out = tmp_path / "trimmed.gguf"
    report = make_draft(models.target, out, corpus_files(), vocab_size=2000, progress=False)
    assert report.draft_vocab < report.source_vocab
    with load_pair(out, models.target, n_ctx=CTX, n_threads=1) as pair:
        assert pair.report.trimmed and pair.report.n_missing == report.source_vocab - report.draft_vocab
        reference = greedy(pair, PROMPT, "target")
        spec = greedy(pair, PROMPT, "spec", draft_source="model")
        assert spec.tokens == reference.tokens
        assert spec.stats.n_drafted > 0


def test_padded_qwen_pair_decodes_losslessly(family_models):
    """Qwen2.5-0.5B (151,936 tokens) drafting for a 7B-like target padded to 152,064: accepted as
    llama.cpp accepts it, reported with both sizes, greedy spec equal to target-only."""
    models = family_models["qwen2.5"]
    with open_family(models, padded=True) as pair:
        r = pair.report
        assert r.padded and not r.trimmed
        assert (r.draft_vocab, r.target_vocab, r.n_missing) == (151936, 151936 + N_PAD, N_PAD)
        for prompt in (PROMPT, REPEATING):
            reference = greedy(pair, prompt, "target", max_tokens=48)
            spec = greedy(pair, prompt, "spec", max_tokens=48)
            assert spec.tokens == reference.tokens
            assert spec.stats.n_accepted > 0
            assert all(0 <= t < r.target_vocab for t in spec.tokens)


def test_padded_target_tokens_reach_the_draft_as_its_fill_token(family_models):
    """A token only the padded target has is fed to the draft as the draft's padding token, and
    decoding continues (spec equals target-only across it)."""
    models = family_models["qwen2.5"]
    with open_family(models, padded=True) as pair:
        pad_id = 151936 + 5
        prompt = pair.tokenize("Hello") + [pad_id] + pair.tokenize(" world", add_bos=False)
        slot = pair.engine.slots[0]
        assert slot.to_model([pad_id]) == [int(pair.draft.metadata["tokenizer.ggml.padding_token_id"])]
        assert greedy(pair, prompt, "spec").tokens == greedy(pair, prompt, "target").tokens


def test_pairs_from_two_families_are_refused_naming_both_tokenizers(family_models):
    with pytest.raises(IncompatiblePairError) as e:
        load_pair(family_models["llama3"].draft, family_models["qwen2.5"].target, n_ctx=CTX, n_threads=1)
    message = str(e.value)
    assert "gpt2/llama-bpe" in message and "gpt2/qwen2" in message
    assert "make-draft" in message and "--draft-source ngram" in message
    # SPM against BPE, and two SPM vocabularies of different families.
    for draft, target in (("phi3", "gpt2"), ("gemma4", "phi3")):
        with pytest.raises(IncompatiblePairError, match="different tokenizers"):
            load_pair(family_models[draft].draft, family_models[target].target, n_ctx=CTX, n_threads=1)


def test_a_draft_bigger_than_its_target_is_refused(family_models):
    models = family_models["qwen2.5"]
    with pytest.raises(IncompatiblePairError, match="extra .padding. tokens at the end of the TARGET"):
        load_pair(models.padded_target, models.target, n_ctx=CTX, n_threads=1)


def test_a_vocab_only_gguf_is_a_clear_error():
    path = vocab_path("qwen2")
    with pytest.raises(ModelLoadError, match="vocabulary-only GGUF .no weights."):
        check_gguf_file(path)
    out = subprocess.run([sys.executable, "-m", "cli.main", "info", "--target", str(path)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "vocabulary-only GGUF" in out.stderr and "Traceback" not in out.stderr


def test_info_reports_both_vocabulary_sizes_and_the_build(family_models):
    models = family_models["qwen2.5"]
    out = subprocess.run([sys.executable, "-m", "cli.main", "info", "--draft", str(models.draft), "--target",
                          str(models.padded_target), "--threads", "1", "--ctx-size", "256"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "target 152064, draft 151936 tokens" in out.stdout
    assert "padded pair: the target has 128 extra tokens" in out.stdout
    assert "llama.cpp build: CPU :" in out.stdout and "kernels: exact; bit-exact" in out.stdout


# -- sampling --------------------------------------------------------------------------------------------


def test_sampled_spec_on_a_bpe_family_follows_the_target(family_models):
    """Sampled spec on Qwen (BPE, padded pair): the second generated token's distribution, given
    a fixed first token, matches target-only sampling's (chi-square over 600 seeds each)."""
    from stats_util import assert_matches

    models = family_models["qwen2.5"]
    with open_family(models, padded=True) as pair:
        prompt = pair.tokenize("Once upon a time")
        first = greedy(pair, prompt, "target", max_tokens=1).tokens[0]
        context = prompt + [first]
        # The exact next-token distribution under the sampling settings, from the target alone.
        from cospec_local.sampling import SamplingParams, logits_to_probs

        pair.target.reset()
        logits = np.array(pair.target.eval(context, 1)[0], dtype=np.float64)
        params = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0)
        exact = logits_to_probs(logits, params)
        support = np.flatnonzero(exact)
        counts = np.zeros(len(support))
        for seed in range(600):
            out = pair.generate(context, mode="spec", temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, seed=seed,
                                max_tokens=1, adaptive=False, draft_max=3)
            counts[np.searchsorted(support, out.tokens[0])] += 1
        assert_matches(counts, exact[support])


# -- chat ---------------------------------------------------------------------------------------------


CHAT_FAMILIES = ["llama3", "qwen2.5", "qwen3", "gemma4", "phi3", "deepseek-r1-qwen"]


FIRST, SECOND = "Hi there, who are you?", "And what can you do?"


@pytest.fixture(scope="session")
def chat_models(family_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-families")
    return {name: build_chat_family(family_models[name], out / name, FIRST) for name in CHAT_FAMILIES}


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_chat_through_the_real_template_stops_at_end_of_turn_and_reuses_the_cache(chat_models, name):
    """Two turns through the family's real chat template: the first reply ends at the family's
    end-of-turn token (never shown), the second turn evaluates only its new text (the first
    turn's KV entries reused), and spec replies equal target-only's in both turns."""
    models = chat_models[name]
    eot = models.family.end_of_turn
    replies = {}
    for mode in ("target", "spec"):
        with open_family(models) as pair:
            assert pair.target.chat_template and eot in pair.target.chat_template
            chat = pair.chat()
            first = chat.say(FIRST, mode=mode, temperature=0.0, max_tokens=48, adaptive=False)
            assert first.finish_reason == "stop" and 1 <= len(first.tokens) < 24, (name, first)
            assert eot not in first.text
            first_prompt = pair.tokenize(chat.template.render([{"role": "user", "content": FIRST}], True))
            second = chat.say(SECOND, mode=mode, temperature=0.0, max_tokens=48, adaptive=False)
            # The second prompt extends the first where the template re-renders history as it was
            # generated; Gemma 4's and R1's generation prompts hold text their history drops, so
            # there they share the turns up to the model's. The shared part is reused.
            second_prompt = pair.tokenize(chat.template.render(chat.messages[:3], True))
            shared = next((i for i, (a, b) in enumerate(zip(first_prompt, second_prompt)) if a != b), len(first_prompt))
            if models.family.history_extends_prompt:
                assert shared == len(first_prompt)
            assert second.stats.n_prompt_cached >= shared - 1
            assert second.stats.n_prompt_cached < second.stats.n_prompt
            assert eot not in second.text
            replies[mode] = (first.tokens, second.tokens)
    assert replies["spec"] == replies["target"]


def test_server_chat_on_a_bpe_family(chat_models):
    """The OpenAI chat endpoint on the Llama 3 family: the reply is the ChatSession's (greedy) and
    ends at <|eot_id|> with finish_reason 'stop'."""
    from server_load import ServerProcess, client

    models = chat_models["llama3"]
    with load_pair(models.draft, models.target, n_ctx=CTX, n_threads=1) as pair:
        expected = pair.chat().say("Hi there, who are you?", temperature=0.0, max_tokens=48, adaptive=False)
    assert expected.finish_reason == "stop"
    with ServerProcess("--draft", models.draft, "--target", models.target, "--ctx-size", CTX, "--threads", 1) as server:
        reply = client(server).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hi there, who are you?"}], max_tokens=48, temperature=0,
            extra_body={"adaptive": False})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == expected.text.strip()
    assert "<|eot_id|>" not in reply.choices[0].message.content

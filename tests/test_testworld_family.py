"""The shipped model family (models/family): files intact, loadable, and the target solves problems."""

import hashlib
from pathlib import Path

import pytest

import numpy as np

from cospec_local.backend import LlamaModel, LoadOptions
from cospec_local.lab.testworld.gguf_export import EOS_ID, CharVocab  # noqa: E402
from cospec_local.lab.probes import first_disagreement  # noqa: E402
from cospec_local.lab.testworld.headroom import MAX_NEW_TOKENS, evaluate_problem, greedy_continue, load_family_pair  # noqa: E402
from cospec_local.lab.testworld.tasks import FAMILIES, check, problems  # noqa: E402

FAMILY_DIR = Path(__file__).resolve().parents[1] / "models" / "family"
MEMBERS = ("target", "draft", "counter")


def test_shipped_files_match_their_sha256sums():
    sums = dict(reversed(line.split("  ")) for line in (FAMILY_DIR / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {f"{name}.gguf" for name in MEMBERS}
    for file_name, digest in sums.items():
        assert hashlib.sha256((FAMILY_DIR / file_name).read_bytes()).hexdigest() == digest, file_name


@pytest.fixture(scope="module")
def family():
    return {name: LlamaModel(FAMILY_DIR / f"{name}.gguf", LoadOptions(n_ctx=512, n_threads=1)) for name in MEMBERS}


@pytest.fixture(scope="module")
def pair():
    with load_family_pair(FAMILY_DIR / "target.gguf", FAMILY_DIR / "draft.gguf") as pair:
        yield pair


def raw_greedy(model, prefix_ids, max_new=MAX_NEW_TOKENS):
    """Greedy decoding straight on the backend, one token per call: the reference the
    engine-driven headroom functions are checked against."""
    model.reset()
    row = model.eval(prefix_ids, 1)[0]
    new_ids = []
    for _ in range(max_new):
        token = int(np.argmax(row))
        if token == EOS_ID:
            break
        new_ids.append(token)
        row = model.eval([token], 1)[0]
    return new_ids


def raw_first_disagreement(model, prompt_ids, reference_ids):
    model.reset()
    row = model.eval(prompt_ids, 1)[0]
    for position, reference in enumerate(reference_ids + [EOS_ID]):
        if int(np.argmax(row)) != reference:
            return position, int(np.argmax(row))
        if reference != EOS_ID:
            row = model.eval([reference], 1)[0]
    return None


def test_members_share_the_character_vocabulary(family):
    vocab = CharVocab()
    for model in family.values():
        assert model.n_vocab == vocab.n_vocab
        assert model.tokenize("Q: 12+34=?\n", add_bos=True, special=False) == vocab.encode("Q: 12+34=?\n")


@pytest.mark.parametrize("family_name", FAMILIES)
def test_target_solves_some_eval_problems(pair, family_name):
    vocab = CharVocab()
    solved = 0
    for problem in problems(family_name, "eval", 20):
        completion = vocab.decode(greedy_continue(pair, vocab.encode(problem.prompt)))
        solved += check(family_name, completion, problem.answer)
    assert solved >= 5, f"target solved only {solved}/20 {family_name} problems"


def test_first_disagreement_and_swap_bookkeeping(family, pair):
    """evaluate_problem's verdicts, recomputed independently on the raw backend (one token per
    call, no engine): target_correct and draft_correct are
    the checker's verdicts on each model's own greedy completion, and swapped_correct is the
    verdict on the target's greedy continuation after forcing the draft's token at the first
    disagreement (the completion ends there when the draft's token is EOS). The first 8 "add"
    problems include swaps that fix a wrong target answer and swaps that break a right one, so a
    swapped_correct that merely copied target_correct would fail here."""
    vocab = CharVocab()
    target, draft = family["target"], family["draft"]
    swaps_differing = {True: 0, False: 0}  # keyed by target_correct, when swapped_correct differs
    for problem in problems("add", "eval", 8):
        prompt_ids = vocab.encode(problem.prompt)
        target_ids = raw_greedy(target, prompt_ids)
        found = raw_first_disagreement(draft, prompt_ids, target_ids)
        draft_ids = raw_greedy(draft, prompt_ids)
        assert greedy_continue(pair, prompt_ids) == target_ids
        assert greedy_continue(pair, prompt_ids, mode="draft") == draft_ids
        assert first_disagreement(pair, prompt_ids, target_ids) == found
        if found is None:  # the draft reproduces the target's completion exactly
            assert draft_ids == target_ids
            swapped_ids = target_ids
        else:  # both greedy completions share the prefix up to the first disagreement
            position, draft_token = found
            assert draft_ids[:position] == target_ids[:position]
            assert (draft_ids + [EOS_ID])[position] == draft_token
            if draft_token == EOS_ID:
                swapped_ids = target_ids[:position]
            else:
                forced = target_ids[:position] + [draft_token]
                swapped_ids = forced + raw_greedy(target, prompt_ids + forced, max_new=MAX_NEW_TOKENS - len(forced))
        outcome = evaluate_problem(problem, pair, vocab)
        assert outcome.disagreement_position == (None if found is None else found[0])
        assert outcome.target_correct == check("add", vocab.decode(target_ids), problem.answer)
        assert outcome.draft_correct == check("add", vocab.decode(draft_ids), problem.answer)
        assert outcome.swapped_correct == check("add", vocab.decode(swapped_ids), problem.answer)
        assert outcome.oracle_correct == (outcome.target_correct or outcome.swapped_correct)
        if outcome.swapped_correct != outcome.target_correct:
            swaps_differing[outcome.target_correct] += 1
    assert swaps_differing[True] >= 1 and swaps_differing[False] >= 1, swaps_differing

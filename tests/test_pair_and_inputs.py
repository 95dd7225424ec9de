"""Pair checks, token maps, make-draft, bad inputs and memory bounds."""

import os

import numpy as np
import pytest

from cospec_local import IncompatiblePairError, ModelLoadError, load_pair
from cospec_local.backend import LlamaModel, LoadOptions
from cospec_local.draft_maker import make_draft
from cospec_local.vocab import TokenMap
from cospec_local.lab.testworld.gguf_export import make_random_llama_gguf
from gguf_util import copy_gguf_with

CORPUS = "the cat sat on the mat. the dog ate the hat. that is that.\n\n" * 20


def test_token_map_both_ways():
    m = TokenMap.from_draft_ids(np.array([0, 1, 2, 7, 9]), n_target_vocab=10, draft_unk=0)
    assert m.to_target(3) == 7
    assert m.to_draft([7, 9, 2]) == [3, 4, 2]
    assert m.to_draft([5]) == [0]  # absent from the draft: its unknown token
    assert m.n_missing == 5
    draft_probs = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    row = m.row(draft_probs)
    dense = np.zeros(10)
    dense[[0, 1, 2, 7, 9]] = draft_probs
    assert [row[t] for t in range(10)] == dense.tolist()
    target_probs = np.linspace(1, 10, 10) / 55
    np.testing.assert_allclose(row.residual_from(target_probs), np.maximum(target_probs - dense, 0))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        LlamaModel(tmp_path / "nope.gguf")


def test_non_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        LlamaModel(bad)


def test_truncated_gguf_is_a_clear_error(tmp_path, tiny_target):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_target.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaModel(cut)


def test_different_vocabulary_sizes_are_refused(tiny_target, tiny_small_vocab):
    with pytest.raises(IncompatiblePairError, match="vocabulary sizes differ"):
        load_pair(tiny_small_vocab, tiny_target)


def test_different_token_text_is_refused(tmp_path, tiny_target):
    from conftest import TINY_CHARS

    other = make_random_llama_gguf(tmp_path / "o.gguf", chars=TINY_CHARS.replace("z", "Z"), n_embd=32, n_layer=1)
    with pytest.raises(IncompatiblePairError, match="vocabularies differ: draft token .* 'Z'"):
        load_pair(other, tiny_target)


def test_different_eos_is_refused(tmp_path, tiny_target):
    bad = copy_gguf_with(tiny_target, tmp_path / "eos.gguf", **{"tokenizer.ggml.eos_token_id": 5})
    with pytest.raises(IncompatiblePairError, match="EOS tokens differ"):
        load_pair(bad, tiny_target)


def test_make_draft_trims_vocabulary_and_stays_lossless(tmp_path, tiny_target):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "draft.gguf"
    report = make_draft(tiny_target, out, [corpus], vocab_size=8, progress=False)
    assert report.n_frequent == 8
    assert report.draft_vocab == 8 + report.n_special
    assert report.n_special == 3 + 256  # unk, bos, eos and the byte tokens
    from collections import Counter

    text = "".join(b + "\n\n" for b in CORPUS.split("\n\n") if b.strip())
    counts = Counter(text)  # one token per character with this vocabulary
    expected = sum(n for _, n in counts.most_common(8)) / len(text)
    assert report.corpus_tokens == len(text)
    assert report.corpus_coverage == pytest.approx(expected)
    with load_pair(out, tiny_target, n_ctx=512, n_threads=1) as pair:
        assert pair.report.trimmed and pair.report.draft_vocab == report.draft_vocab
        d2t = pair.report.token_map.draft_to_target
        for d_id in range(pair.draft.n_vocab):
            assert pair.draft.token_text(d_id) == pair.target.token_text(int(d2t[d_id]))
        for prompt in ["the cat", "zebra quiz 42"]:  # the second is mostly outside the draft vocab
            ref = pair.generate(prompt, temperature=0, mode="target", max_tokens=40)
            for k in (1, 4):
                out_spec = pair.generate(prompt, temperature=0, draft_max=k, adaptive=False, draft_p_min=0, max_tokens=40)
                assert out_spec.tokens == ref.tokens


def test_make_draft_keeps_draft_equal_to_source_on_kept_tokens(tmp_path, tiny_target):
    """Trimming only removes rows of the head: logits of kept tokens are unchanged."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "draft.gguf"
    make_draft(tiny_target, out, [corpus], vocab_size=12, progress=False)
    with load_pair(out, tiny_target, n_ctx=256, n_threads=1) as pair:
        prompt = pair.tokenize("the cat")
        target_row = pair.target.eval(prompt, 1)[0].copy()
        draft_row = pair.draft.eval(pair.report.token_map.to_draft(prompt), 1)[0].copy()
        np.testing.assert_allclose(draft_row, target_row[pair.report.token_map.draft_to_target], atol=1e-4)


def test_make_draft_can_drop_layers(tmp_path, tiny_dir):
    src = make_random_llama_gguf(tiny_dir / "three_layers.gguf", chars="abc .", n_embd=32, n_layer=3, seed=4)
    out = tmp_path / "dropped.gguf"
    report = make_draft(src, out, [], vocab_size=4, drop_layers=[1], progress=False)
    assert (report.n_layers_source, report.n_layers_draft) == (3, 2)
    with LlamaModel(out, LoadOptions(n_ctx=64)) as m:
        assert m.n_layer() == 2
    with pytest.raises(Exception, match="drop_layers"):
        make_draft(src, tmp_path / "x.gguf", [], vocab_size=4, drop_layers=[0, 1, 2], progress=False)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read memory use")
def test_host_memory_does_not_grow_with_context_times_vocab(tmp_path):
    """A 20k-token vocabulary at n_ctx = 65536 would need 5 GB for logits_all; we use a few MB."""
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 20000))  # CJK block: a wide vocabulary
    path = make_random_llama_gguf(tmp_path / "wide.gguf", chars=chars, n_embd=32, n_layer=1, n_head=2, n_ff=64, n_ctx=65536)
    before = _rss_mb()
    with LlamaModel(path, LoadOptions(n_ctx=65536, n_threads=1)) as model:
        model.eval(list(range(300, 1300)), 1)
        grown = _rss_mb() - before
    # KV cache (65536 x 1 layer x 2 x 32 x f16 = 8 MB), weights (~5 MB), one batch of logits rows.
    assert grown < 400, f"host memory grew by {grown:.0f} MB"


def test_a_model_that_cannot_roll_back_gets_a_clear_error(tiny_target, monkeypatch):
    """Recurrent/hybrid models cannot drop a suffix of their memory: llama_memory_seq_rm then
    returns False, and speculative decoding must say so instead of decoding garbage."""
    import llama_cpp

    from cospec_local import RollbackError

    with load_pair(tiny_target, tiny_target, n_ctx=256, n_threads=1) as pair:
        pair.generate("the cat", temperature=0, max_tokens=5)
        monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda *args: False)
        with pytest.raises(RollbackError, match="cannot remove part of this model's memory"):
            pair.generate("the dog", temperature=0, max_tokens=5)

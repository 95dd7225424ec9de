"""The GGUF writer: llama.cpp loads its files, tokenizes char by char, and random models are usable."""

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from cospec_local.lab.testworld.gguf_export import (  # noqa: E402
    BOS_ID,
    CharVocab,
    LlamaConfig,
    make_random_llama_gguf,
    random_llama_weights,
    write_llama_gguf,
)

ROUND_TRIP_TEXTS = [
    "Hello world! 12+34=46",
    "  two leading spaces, trailing space ",
    "line one\nline two\n\nANSWER: 7",
    "symbols ~{}|\\`^_ and non-ASCII: é ü ∑ 漢",
]


def load(path, n_ctx=128):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx,
                           logits_all=True, verbose=False)


def prompt_logits(model, ids):
    """Logits of every position of `ids` (fresh context)."""
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float64)


@pytest.fixture(scope="module")
def random_model_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {
        "seed0": make_random_llama_gguf(root / "seed0.gguf", seed=0),
        "seed0_again": make_random_llama_gguf(root / "seed0_again.gguf", seed=0),
        "seed1": make_random_llama_gguf(root / "seed1.gguf", seed=1),
    }


@pytest.fixture(scope="module")
def seed0_model(random_model_paths):
    return load(random_model_paths["seed0"])


def test_tokenizer_round_trip_matches_python_vocab(seed0_model):
    vocab = CharVocab()
    for text in ROUND_TRIP_TEXTS:
        ids = seed0_model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert ids == vocab.encode(text), text
        assert ids[0] == BOS_ID
        # Detokenize without the BOS: llama-cpp-python's detokenize drops one leading space after a
        # BOS (a Llama-1 habit of the bindings, not of llama.cpp), which would hide real bugs.
        assert seed0_model.detokenize(ids[1:]).decode("utf-8") == text
        assert vocab.decode(ids) == text


def test_tokenization_is_one_token_per_printable_char(seed0_model):
    text = "ab c"
    ids = seed0_model.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) == len(text)
    assert seed0_model.n_vocab() == CharVocab().n_vocab


def test_same_seed_gives_identical_files(random_model_paths):
    same_a = random_model_paths["seed0"].read_bytes()
    same_b = random_model_paths["seed0_again"].read_bytes()
    assert same_a == same_b
    assert same_a != random_model_paths["seed1"].read_bytes()


def test_random_logits_are_neither_one_hot_nor_uniform(seed0_model):
    ids = CharVocab().encode("The quick brown fox 123")
    logits = prompt_logits(seed0_model, ids)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = probs.max(axis=1)
    assert np.all(top < 0.99), "softmax is (nearly) one-hot"
    assert np.all(top > 5.0 / probs.shape[1]), "softmax is (nearly) uniform"


def test_different_seeds_disagree_on_most_greedy_tokens(random_model_paths, seed0_model):
    ids = CharVocab().encode("Different seeds, different models: 0123456789 abcdefghij")
    other = load(random_model_paths["seed1"])
    agreement = np.mean(prompt_logits(seed0_model, ids).argmax(1) == prompt_logits(other, ids).argmax(1))
    assert agreement < 0.5


def test_untied_output_and_grouped_query_attention_load(tmp_path):
    vocab = CharVocab("0123456789 +=")
    config = LlamaConfig(n_vocab=vocab.n_vocab, n_embd=32, n_layer=1, n_head=4, n_head_kv=2,
                         n_ff=64, tied_output=False)
    path = write_llama_gguf(tmp_path / "untied.gguf", random_llama_weights(config, seed=3), config, vocab)
    model = load(path)
    logits = prompt_logits(model, vocab.encode("12+3="))
    assert logits.shape == (6, vocab.n_vocab)
    assert np.all(np.isfinite(logits))


def test_writer_rejects_wrong_shapes(tmp_path):
    vocab = CharVocab("ab")
    config = LlamaConfig(n_vocab=vocab.n_vocab, n_embd=16, n_layer=1, n_head=2, n_ff=32)
    weights = random_llama_weights(config, seed=0)
    weights["blk.0.ffn_up.weight"] = weights["blk.0.ffn_up.weight"].T
    with pytest.raises(ValueError, match="ffn_up"):
        write_llama_gguf(tmp_path / "bad.gguf", weights, config, vocab)
    del weights["blk.0.ffn_up.weight"]
    with pytest.raises(ValueError, match="missing"):
        write_llama_gguf(tmp_path / "bad.gguf", weights, config, vocab)

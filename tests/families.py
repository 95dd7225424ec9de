"""Tiny seeded random-weight models of real model families, built at test time.

The tokenizers and chat templates are real data nobody here wrote: llama.cpp's vocab-only GGUFs
(`ggml-vocab-*.gguf`, with the `.inp`/`.out` tokenizer test vectors beside them) and its chat
templates (`templates/*.jinja`), from the `vendor/llama.cpp/models` folder of the llama-cpp-python
sdist that `make` keeps (unpacked to $COSPEC_LLAMA_CPP_MODELS, or the cache path below).

Each family gets a target (2 layers) and a draft (the target's first layer only, so the two agree
on some tokens and not on others), both of llama architecture around the family's own tokenizer
metadata copied key by key. Equality tests hold whatever the weights are. Qwen also gets a target
padded by 128 `[PAD...]` tokens, like Qwen2.5-7B's 152,064 against 0.5B's 151,936.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cospec_local.lab.testworld.gguf_export import LlamaConfig, add_llama_hparams, expected_shapes, random_llama_weights

DEFAULT_MODELS_DIR = Path.home() / ".cache" / "cospec-local" / "llama.cpp-0.3.36" / "models"
N_PAD = 128  # Qwen2.5-7B's padding over 0.5B's vocabulary (152,064 - 151,936)
TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNUSED = 3, 5


def models_dir() -> Path:
    """The sdist's vendor/llama.cpp/models; an AssertionError (never a skip) when `make` did not
    unpack it."""
    path = Path(os.environ.get("COSPEC_LLAMA_CPP_MODELS", DEFAULT_MODELS_DIR))
    assert (path / "ggml-vocab-qwen2.gguf").is_file(), (
        f"llama.cpp's vocab-only GGUFs are not at {path}: run `make setup` (it keeps the llama-cpp-python sdist "
        "and unpacks its vendor/llama.cpp/models there), or set COSPEC_LLAMA_CPP_MODELS")
    return path


@dataclass(frozen=True)
class Family:
    """A model family: its vocabulary file, its chat template and the token its turns end with."""

    name: str
    vocab: str  # ggml-vocab-<vocab>.gguf
    template: str | None  # templates/<template>, None: a base model (no template)
    end_of_turn: str | None  # the token text a reply ends with under the template
    # (id, text) of control tokens the real model has where the vocab file has [PAD<id>] or another
    # family's token: the vocab files carry only the first few special tokens.
    renames: tuple = ()
    # False where the generation prompt holds text its history drops (Gemma 4's empty thought
    # channel, R1's opening <think>): a second turn then reuses the cache only up to the model turn.
    history_extends_prompt: bool = True


FAMILIES = {f.name: f for f in [
    Family("llama3", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct.jinja", "<|eot_id|>"),
    Family("qwen2.5", "qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_end|>"),
    Family("qwen3", "qwen35", "Qwen-Qwen3-0.6B.jinja", "<|im_end|>",
           renames=((151667, "<think>"), (151668, "</think>"))),
    Family("gemma4", "gemma-4", "google-gemma-4-31B-it.jinja", "<turn|>", history_extends_prompt=False),
    Family("phi3", "phi-3", "microsoft-Phi-3.5-mini-instruct.jinja", "<|end|>"),
    Family("gpt2", "gpt-2", None, None),
    Family("deepseek-llm", "deepseek-llm", None, None),
    # DeepSeek-R1-Distill-Qwen: Qwen2's vocabulary with DeepSeek's control tokens at 151643-151649.
    Family("deepseek-r1-qwen", "qwen2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "<｜end▁of▁sentence｜>",
           renames=((151643, "<｜end▁of▁sentence｜>"), (151644, "<｜User｜>"), (151645, "<｜Assistant｜>"),
                    (151646, "<｜begin▁of▁sentence｜>"), (151648, "<think>"), (151649, "</think>")),
           history_extends_prompt=False),
]}


def vocab_path(vocab: str) -> Path:
    return models_dir() / f"ggml-vocab-{vocab}.gguf"


def tokenizer_vectors(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for `vocab`: (text, token ids, no BOS) pairs, split as its
    tests/test-tokenizer-0.cpp splits them."""
    base = models_dir() / f"ggml-vocab-{vocab}.gguf"
    raw = Path(f"{base}.inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    texts = raw.split(sep)
    if texts and texts[-1] == "":  # the file ends with a separator
        texts.pop()
    outs = Path(f"{base}.out").read_bytes().decode("utf-8").split("\n")
    if outs and outs[-1] == "":
        outs.pop()
    assert len(texts) == len(outs), f"{base}: {len(texts)} inputs but {len(outs)} outputs"
    return [(text, [int(x) for x in out.split()]) for text, out in zip(texts, outs)]


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@functools.lru_cache(maxsize=None)
def tokenizer_fields(vocab: str) -> tuple:
    """(key, value, type, element type) of every tokenizer.* key of a vocab-only GGUF; strings
    stay bytes. A direct reader of GGUF's key-value section: gguf.GGUFReader builds a numpy view per
    array element and took 9-45 s per vocabulary here (400k+ token and merge strings), this ~1 s."""
    import struct

    data = Path(vocab_path(vocab)).read_bytes()
    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos = 24

    def read_string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n:pos]

    def read_value(vtype):
        nonlocal pos
        if vtype == _STRING:
            return read_string()
        fmt = "<" + _SCALAR[vtype]
        pos += struct.calcsize(fmt)
        return struct.unpack_from(fmt, data, pos - struct.calcsize(fmt))[0]

    out = []
    for _ in range(n_kv):
        key = read_string().decode()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        sub_type = None
        if vtype == _ARRAY:
            sub_type, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub_type == _STRING:
                value = [read_string() for _ in range(n)]
            else:
                fmt = "<" + _SCALAR[sub_type]
                value = list(struct.unpack_from(f"<{n}{_SCALAR[sub_type]}", data, pos))
                pos += n * struct.calcsize(fmt)
        else:
            value = read_value(vtype)
        if key.startswith("tokenizer."):
            out.append((key, value, vtype, sub_type))
    return tuple(out)


def vocab_tokens(family: Family) -> list[bytes]:
    """The family's real token list (before renames and padding)."""
    return next(v for k, v, _, _ in tokenizer_fields(family.vocab) if k == "tokenizer.ggml.tokens")


def token_texts(family: Family) -> list[str]:
    """The family's token texts in id order (its renames applied)."""
    tokens = vocab_tokens(family)
    texts = [t.decode("utf-8", "replace") for t in tokens]
    for token_id, text in family.renames:
        texts[token_id] = text
    return texts


def family_config(n_vocab: int, n_layer: int, tied_output: bool = True) -> LlamaConfig:
    return LlamaConfig(n_vocab=n_vocab, n_embd=64, n_layer=n_layer, n_head=4, n_ff=128, n_ctx=1024,
                       tied_output=tied_output)


def add_family_tokenizer(writer, family: Family, n_pad: int = 0) -> int:
    """Write `family`'s real tokenizer keys (with its renamed control tokens and `n_pad` padding
    tokens) and its chat template; return the vocabulary size."""
    import gguf

    n_real = len(vocab_tokens(family))
    for key, value, val_type, sub_type in tokenizer_fields(family.vocab):
        if key == "tokenizer.chat_template":
            continue  # the family's own template file is written below
        if key == "tokenizer.ggml.tokens":
            value = list(value) + [f"[PAD{n_real + i}]".encode() for i in range(n_pad)]
            for token_id, text in family.renames:
                value[token_id] = text.encode()
        elif key == "tokenizer.ggml.token_type":
            value = list(value) + [TOKEN_TYPE_UNUSED] * n_pad
            for token_id, _ in family.renames:
                value[token_id] = TOKEN_TYPE_CONTROL
        elif n_pad and key == "tokenizer.ggml.scores":
            value = list(value) + [-1e9] * n_pad
        writer.add_key_value(key, value, gguf.GGUFValueType(val_type),
                             sub_type=None if sub_type is None else gguf.GGUFValueType(sub_type))
    if family.template is not None:
        writer.add_chat_template((models_dir() / "templates" / family.template).read_text(encoding="utf-8"))
    return n_real + n_pad


def write_family_model(path: Path, family: Family, weights: dict, n_layer: int, n_pad: int = 0) -> Path:
    """A llama-architecture GGUF with `family`'s real tokenizer and chat template, and the given
    weights (F16 matrices) for `n_layer` layers. `n_pad` appends that many `[PAD<id>]` tokens (type
    UNUSED) after the real vocabulary, as Hugging Face conversion writes padded embedding rows."""
    import gguf

    config = family_config(len(vocab_tokens(family)) + n_pad, n_layer, tied_output="output.weight" not in weights)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"cospec-family-{family.name}-{n_layer}l")
    add_llama_hparams(writer, config)
    add_family_tokenizer(writer, family, n_pad)
    for name in expected_shapes(config):
        w = weights[name]
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float16 if w.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class FamilyModels:
    family: Family
    target: Path
    draft: Path
    padded_target: Path | None = None  # the target with N_PAD extra tokens (Qwen only)
    n_vocab: int = 0


def _weights(family: Family, seed: int) -> dict:
    return random_llama_weights(family_config(len(token_texts(family)), 2), seed)


def build_family(family: Family, out_dir: Path, seed: int = 0) -> FamilyModels:
    """Write the family's target (2 layers), its draft (the target's first layer, embedding and
    final norm: they agree on some tokens, not all), and for Qwen the target padded by N_PAD rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = _weights(family, seed)
    target = write_family_model(out_dir / f"{family.name}-target.gguf", family, weights, n_layer=2)
    draft = write_family_model(out_dir / f"{family.name}-draft.gguf", family, weights, n_layer=1)
    padded = None
    if family.name == "qwen2.5":
        rng = np.random.default_rng(seed + 1)
        embd = weights["token_embd.weight"]
        extra = rng.standard_normal((N_PAD, embd.shape[1])).astype(np.float32) * 2.5 / np.sqrt(embd.shape[1])
        padded_weights = dict(weights, **{"token_embd.weight": np.concatenate([embd, extra])})
        padded = write_family_model(out_dir / f"{family.name}-padded-target.gguf", family, padded_weights, n_layer=2,
                                    n_pad=N_PAD)
    return FamilyModels(family, target, draft, padded, len(weights["token_embd.weight"]))


def build_chat_family(models: FamilyModels, out_dir: Path, first_message: str, seed: int = 0) -> FamilyModels:
    """The family's target and draft made to end their replies. Random models never pick the
    end-of-turn token on their own (greedy replies fall into loops), so these get an untied output
    head, equal to the embedding except the end-of-turn row: 1.1x the row of a token X that the
    first greedy reply writes (its first token not seen before, from the 2nd on). The input
    embedding is unchanged, so the reply is the same until X would win the argmax; there the end
    of turn wins (its logit is 1.1x X's positive maximum), and the reply to `first_message` ends."""
    from cospec_local import load_pair

    family = models.family
    with load_pair(None, models.target, n_ctx=1024, n_threads=1) as pair:
        reply = pair.chat().say(first_message, mode="target", temperature=0.0, max_tokens=24).tokens
    x = next(t for i, t in enumerate(reply) if i >= 1 and t not in reply[:i])
    weights = _weights(family, seed)
    output = weights["token_embd.weight"].copy()
    output[token_texts(family).index(family.end_of_turn)] = 1.1 * output[x]
    weights["output.weight"] = output
    out_dir.mkdir(parents=True, exist_ok=True)
    target = write_family_model(out_dir / f"{family.name}-chat-target.gguf", family, weights, n_layer=2)
    draft = write_family_model(out_dir / f"{family.name}-chat-draft.gguf", family, weights, n_layer=1)
    return FamilyModels(family, target, draft, None, models.n_vocab)

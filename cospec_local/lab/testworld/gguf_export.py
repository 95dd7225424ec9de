"""Write tiny llama-architecture GGUF files that llama.cpp loads, with a character-level tokenizer.

API:
- `CharVocab(chars=DEFAULT_CHARS)`: SentencePiece-style ("llama") vocabulary: `<unk>`=0, `<s>`=1,
  `</s>`=2, the 256 byte-fallback tokens `<0x00>`..`<0xFF>` (ids 3..258, type BYTE), then one NORMAL
  token per character (a space is stored as `▁`). `encode(text)` / `decode(ids)` reproduce exactly
  what llama.cpp does with this vocabulary: one token per character, characters outside the set
  fall back to their UTF-8 bytes (a newline is the byte token `<0x0A>`). Note that
  llama-cpp-python's `detokenize` drops one leading space when the ids start with the BOS.
- `LlamaConfig`: the hyper-parameters stored in the GGUF metadata.
- `write_llama_gguf(path, weights, config, vocab)`: write F32 weights, keyed by their GGUF tensor
  names (`token_embd.weight`, `blk.{i}.attn_q.weight`, ..., optional `output.weight`), each shaped
  like a PyTorch `nn.Linear` weight, i.e. (out_features, in_features).
- `random_llama_weights(config, seed)` and `make_random_llama_gguf(path, ...)`: a random model whose
  logits are neither one-hot nor uniform; the same seed gives a byte-identical file.

RoPE layout: for `general.architecture = "llama"`, llama.cpp rotates ADJACENT pairs (2i, 2i+1) of
each head's query/key vector (rope type NORM). Hugging Face checkpoints use the "rotate half"
layout, which is why llama.cpp's converter permutes their q/k rows; weights given here are written
as they are, so the model that produced them must already use the adjacent-pair layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPACE_MARK = "\u2581"  # "▁": how SentencePiece spells a space inside a token
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_BYTE_ID = 3
NUM_BYTE_TOKENS = 256
FIRST_CHAR_ID = FIRST_BYTE_ID + NUM_BYTE_TOKENS

# Token types as llama.cpp reads them (gguf.TokenType).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_BYTE = 1, 2, 3, 6

# Printable ASCII (space included). Newlines and anything else go through byte fallback.
DEFAULT_CHARS = "".join(chr(c) for c in range(0x20, 0x7F))


class CharVocab:
    """Character-level SentencePiece-style vocabulary (see the module docstring for the id layout)."""

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab: characters must be unique")
        if SPACE_MARK in chars:
            raise ValueError("CharVocab: use ' ' for a space, not the SentencePiece mark")
        self.chars = chars
        self.char_to_id = {ch: FIRST_CHAR_ID + i for i, ch in enumerate(chars)}

    @property
    def n_vocab(self) -> int:
        """Number of tokens, control and byte tokens included."""
        return FIRST_CHAR_ID + len(self.chars)

    def tokens(self) -> list[str]:
        """Token texts in id order, as stored in `tokenizer.ggml.tokens`."""
        control = ["<unk>", "<s>", "</s>"]
        byte_tokens = [f"<0x{b:02X}>" for b in range(NUM_BYTE_TOKENS)]
        char_tokens = [SPACE_MARK if ch == " " else ch for ch in self.chars]
        return control + byte_tokens + char_tokens

    def token_types(self) -> list[int]:
        """Token types in id order (`tokenizer.ggml.token_type`)."""
        return ([TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
                + [TOKEN_TYPE_BYTE] * NUM_BYTE_TOKENS
                + [TOKEN_TYPE_NORMAL] * len(self.chars))

    def scores(self) -> list[float]:
        """SentencePiece scores in id order. With single characters only, no merge can happen,
        so the values only need to be finite and distinct."""
        return [0.0] * FIRST_CHAR_ID + [-float(i + 1) for i in range(len(self.chars))]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, exactly as llama.cpp tokenizes it with this vocabulary."""
        ids = [BOS_ID] if add_bos else []
        for ch in text:
            char_id = self.char_to_id.get(ch)
            if char_id is not None:
                ids.append(char_id)
            else:
                ids.extend(FIRST_BYTE_ID + b for b in ch.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; control tokens are dropped, byte tokens are joined as UTF-8."""
        out = bytearray()
        for token_id in ids:
            if FIRST_BYTE_ID <= token_id < FIRST_CHAR_ID:
                out.append(token_id - FIRST_BYTE_ID)
            elif FIRST_CHAR_ID <= token_id < self.n_vocab:
                out.extend(self.chars[token_id - FIRST_CHAR_ID].encode("utf-8"))
        return out.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a llama-architecture model, as stored in the GGUF metadata."""

    n_vocab: int
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int | None = None  # None: as many key/value heads as query heads
    n_ff: int = 128
    n_ctx: int = 512
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    tied_output: bool = True

    def __post_init__(self):
        if self.n_head_kv is None:
            object.__setattr__(self, "n_head_kv", self.n_head)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def check(self) -> None:
        """Raise ValueError when the shapes cannot form a valid llama model."""
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        if self.head_dim % 2:
            raise ValueError("RoPE needs an even head width")


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape (PyTorch (out, in) convention) for `config`."""
    d, kv = config.n_embd, config.n_head_kv * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.n_vocab, d),
        "output_norm.weight": (d,),
    }
    if not config.tied_output:
        shapes["output.weight"] = (config.n_vocab, d)
    for i in range(config.n_layer):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (d, d),
            f"blk.{i}.attn_k.weight": (kv, d),
            f"blk.{i}.attn_v.weight": (kv, d),
            f"blk.{i}.attn_output.weight": (d, d),
            f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.ffn_gate.weight": (config.n_ff, d),
            f"blk.{i}.ffn_up.weight": (config.n_ff, d),
            f"blk.{i}.ffn_down.weight": (d, config.n_ff),
        })
    return shapes


def add_llama_hparams(writer, config: LlamaConfig) -> None:
    """Write `config`'s llama hyper-parameters into a gguf.GGUFWriter (architecture "llama")."""
    writer.add_vocab_size(config.n_vocab)
    writer.add_context_length(config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_ff)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head_kv)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_base)


def write_llama_gguf(path: str | Path, weights: dict[str, np.ndarray], config: LlamaConfig,
                     vocab: CharVocab, name: str = "cospec-testworld") -> Path:
    """Write a llama-architecture GGUF with F32 tensors and the character tokenizer `vocab`.

    `weights` maps GGUF tensor names to arrays shaped as `expected_shapes(config)` says; q/k rows must
    already be in llama.cpp's adjacent-pair RoPE layout. Returns the path written.
    """
    import gguf  # imported here: only exporting needs it

    config.check()
    if config.n_vocab != vocab.n_vocab:
        raise ValueError(f"config.n_vocab={config.n_vocab} but the vocabulary has {vocab.n_vocab} tokens")
    shapes = expected_shapes(config)
    if set(weights) != set(shapes):
        missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
        raise ValueError(f"weights do not match the config: missing {missing}, unexpected {extra}")
    for tensor_name, shape in shapes.items():
        if tuple(weights[tensor_name].shape) != shape:
            raise ValueError(f"{tensor_name}: shape {weights[tensor_name].shape}, expected {shape}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_llama_hparams(writer, config)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens())
    writer.add_token_scores(vocab.scores())
    writer.add_token_types(vocab.token_types())
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)  # so that tokenization is exactly one token per character

    for tensor_name in shapes:  # a fixed order keeps files byte-identical across runs
        writer.add_tensor(tensor_name, np.ascontiguousarray(weights[tensor_name], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_llama_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random F32 weights for `config`, scaled so that next-token softmaxes are peaked but not one-hot.

    Hidden states are RMS-normalised before the head, so a logit's spread is about
    `embedding_std * sqrt(n_embd)`; an embedding std of 2.5 / sqrt(n_embd) gives logits with a
    standard deviation near 2.5.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for tensor_name, shape in expected_shapes(config).items():
        if len(shape) == 1:  # RMSNorm gains
            weights[tensor_name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif tensor_name in ("token_embd.weight", "output.weight"):
            weights[tensor_name] = (rng.standard_normal(shape) * 2.5 / np.sqrt(shape[1])).astype(np.float32)
        else:  # fan-in scaling keeps the residual stream's size stable
            weights[tensor_name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return weights


def make_random_llama_gguf(path: str | Path, *, chars: str = DEFAULT_CHARS,
                           n_vocab_chars: int | None = None, n_embd: int = 64,
                           n_layer: int = 2, n_head: int = 4, n_head_kv: int | None = None,
                           n_ff: int = 128, n_ctx: int = 512, tied_output: bool = True,
                           seed: int = 0) -> Path:
    """Write a random tiny llama GGUF with the character vocabulary over `chars`; returns its path.

    `n_vocab_chars`, when given, keeps only the first that many characters of `chars`.

    The same arguments give a byte-identical file; different seeds give models whose greedy next
    tokens mostly differ.
    """
    vocab = CharVocab(chars if n_vocab_chars is None else chars[:n_vocab_chars])
    config = LlamaConfig(n_vocab=vocab.n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                         n_head_kv=n_head_kv, n_ff=n_ff,
                         n_ctx=n_ctx, tied_output=tied_output)
    return write_llama_gguf(path, random_llama_weights(config, seed), config, vocab,
                            name=f"cospec-testworld-random-{seed}")

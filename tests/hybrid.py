"""Tiny seeded random-weight Qwen3.5 (`qwen35`) models: hybrid targets for speculative decoding tests.

Qwen3.5 is a hybrid architecture: most layers are gated delta nets (linear attention with a
recurrent state and a short causal convolution), every `full_attention_interval`-th layer is gated
full attention with a KV cache. llama.cpp (the one vendored in llama-cpp-python 0.3.36) decides
which layers are recurrent from `qwen35.attention.recurrent_layers` (one bool per block, MTP
blocks false) or, when that key is absent, from `qwen35.full_attention_interval` (layer i is
recurrent unless (i + 1) % interval == 0). Both are written here, consistently, as llama.cpp's own
converter does. Shapes and names follow `src/models/qwen35.cpp` and `conversion/qwen.py` of that
llama.cpp.

API:
- `build_qwen35(path, seed, n_layer=4, full_attention_interval=4, n_embd=64, mtp=False, ...)`:
  write the target and return its path. Layers 0-2 recurrent, layer 3 full attention by default.
  `mtp=True` appends one MTP (nextn) block after the trunk, as llama.cpp's qwen35 loader expects:
  `block_count` = n_layer + 1 and `nextn_predict_layers` = 1. llama.cpp skips that block unless
  the model is loaded with `llama_model_params.load_mtp = True` and it only runs in a context made
  with `ctx_type = LLAMA_CONTEXT_TYPE_MTP`. Its eh_proj reads only the next token's embedding, so
  with small residuals (`residual_scale=0.3`, `tied_output=False`) it predicts about what the trunk
  predicts one position later: an MTP draft that is often but not always right (`test_mtp.py`).
- `build_llama_draft(path, seed, n_layer=1, tied_output=True, residual_scale=1.0)`: a
  llama-architecture draft with the same vocabulary (families.write_family_model) and the same
  token embedding as `build_qwen35(..., seed)`.
- `hybrid_probe.build_pair(out_dir, seed, mtp=False)`: a target and a draft that agree on about half of the
  target's greedy tokens (38-54% at seed 0, by prompt), without repetition loops: both get the
  same untied "successor" head (`successor_head`) and residual_scale 0.3, so the current token's
  embedding decides much of the next token and the layers the rest. With the defaults above
  (tied heads, residual_scale 1) a draft agrees on ~0-2% of tokens; tied heads with small
  residual_scale make both repeat one token.
- `QWEN35_FAMILY`: the families.Family both use (vocab `ggml-vocab-qwen35.gguf`, the Qwen3.5 chat
  template, `<think>`/`</think>` at Qwen3's ids).
- `rs_rollback_check` (llama.cpp's own recurrent rollback, which a test pins down) and `RawContext`;
  the exploration beyond the tests (`smoke_check`, `mtp_check`) is in `tests/hybrid_probe.py`:
  `python tests/hybrid_probe.py [out_dir]` builds the models and prints them.

The vocabulary is the real one llama.cpp ships for `qwen35` (151,936 tokens, pre-tokenizer
`qwen35`); `n_pad` appends `[PAD<id>]` rows like families.write_family_model (released Qwen3.5
checkpoints have 248,320 embedding rows: `n_pad=QWEN35_N_PAD`). Weights are F32 except the token
embedding (F16): about 20 MB per target.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from families import FAMILIES, Family, add_family_tokenizer, family_config  # noqa: E402
from families import vocab_tokens, write_family_model  # noqa: E402

ARCH = "qwen35"
QWEN35_FAMILY = Family("qwen3.5", "qwen35", "Qwen3.5-4B.jinja", "<|im_end|>",
                       renames=FAMILIES["qwen3"].renames, history_extends_prompt=False)
QWEN35_N_VOCAB_RELEASED = 248_320  # embedding rows of the released Qwen3.5 checkpoints
QWEN35_N_PAD = QWEN35_N_VOCAB_RELEASED - 151_936  # pad rows to reach them from the vocab file
EMBD_SCALE = 2.5  # token embedding std * sqrt(n_embd): tied-head logits with std near 2.5


@dataclass(frozen=True)
class Qwen35Config:
    """Hyper-parameters of a tiny qwen35 model (defaults: ~1/16 of Qwen3.5-0.8B's widths)."""

    n_vocab: int
    n_layer: int = 4  # trunk layers, MTP block excluded
    full_attention_interval: int = 4
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 1
    head_dim: int = 32
    n_rot: int = 8  # partial rotary factor 0.25, as Qwen3.5
    rope_sections: tuple = (2, 1, 1, 0)  # Qwen3.5's [11, 11, 10, 0] scaled to n_rot / 2
    rope_base: float = 10_000_000.0
    ssm_d_conv: int = 4  # conv kernel
    ssm_d_state: int = 16  # head width of the delta net (keys and values)
    ssm_n_group: int = 2  # key heads
    ssm_dt_rank: int = 4  # value heads (a multiple of the key heads)
    rms_eps: float = 1e-6
    n_ctx: int = 4096
    mtp: bool = False
    tied_output: bool = True
    residual_scale: float = 1.0  # multiplies the matrices that write into the residual stream

    @property
    def n_layer_all(self) -> int:
        return self.n_layer + int(self.mtp)

    @property
    def ssm_d_inner(self) -> int:
        return self.ssm_d_state * self.ssm_dt_rank

    @property
    def conv_dim(self) -> int:
        return 2 * self.ssm_d_state * self.ssm_n_group + self.ssm_d_inner

    def is_recurrent(self, il: int) -> bool:
        return il < self.n_layer and (il + 1) % self.full_attention_interval != 0


def qwen35_hparams(c: Qwen35Config) -> list[tuple[str, object]]:
    """(key, value) of every architecture key written (tokenizer and general.* keys aside)."""
    keys = [
        ("context_length", c.n_ctx),
        ("embedding_length", c.n_embd),
        ("block_count", c.n_layer_all),
        ("feed_forward_length", c.n_ff),
        ("attention.head_count", c.n_head),
        ("attention.head_count_kv", c.n_head_kv),
        ("attention.key_length", c.head_dim),
        ("attention.value_length", c.head_dim),
        ("attention.layer_norm_rms_epsilon", c.rms_eps),
        ("rope.dimension_count", c.n_rot),
        ("rope.dimension_sections", list(c.rope_sections)),
        ("rope.freq_base", c.rope_base),
        ("ssm.conv_kernel", c.ssm_d_conv),
        ("ssm.state_size", c.ssm_d_state),
        ("ssm.group_count", c.ssm_n_group),
        ("ssm.time_step_rank", c.ssm_dt_rank),
        ("ssm.inner_size", c.ssm_d_inner),
        ("full_attention_interval", c.full_attention_interval),
        ("attention.recurrent_layers", [c.is_recurrent(i) for i in range(c.n_layer_all)]),
        ("vocab_size", c.n_vocab),
    ]
    if c.mtp:
        keys.append(("nextn_predict_layers", 1))
    return [(f"{ARCH}.{k}", v) for k, v in keys]


def qwen35_shapes(c: Qwen35Config) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape ((out, in) for matrices: GGUF's ne reversed)."""
    d, hd = c.n_embd, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.n_vocab, d), "output_norm.weight": (d,)}
    if not c.tied_output:
        shapes["output.weight"] = (c.n_vocab, d)

    def attention(b):  # gated full attention: attn_q yields the query and its sigmoid gate
        return {f"{b}.attn_q.weight": (2 * c.n_head * hd, d), f"{b}.attn_k.weight": (c.n_head_kv * hd, d),
                f"{b}.attn_v.weight": (c.n_head_kv * hd, d), f"{b}.attn_output.weight": (d, c.n_head * hd),
                f"{b}.attn_q_norm.weight": (hd,), f"{b}.attn_k_norm.weight": (hd,)}

    def ffn(b):
        return {f"{b}.ffn_gate.weight": (c.n_ff, d), f"{b}.ffn_up.weight": (c.n_ff, d),
                f"{b}.ffn_down.weight": (d, c.n_ff)}

    for il in range(c.n_layer_all):
        b = f"blk.{il}"
        shapes[f"{b}.attn_norm.weight"] = (d,)
        shapes[f"{b}.post_attention_norm.weight"] = (d,)
        if c.is_recurrent(il):  # gated delta net
            shapes.update({
                f"{b}.attn_qkv.weight": (c.conv_dim, d),  # q, k (key heads), v (value heads)
                f"{b}.attn_gate.weight": (c.ssm_d_inner, d),  # z, the output gate
                f"{b}.ssm_conv1d.weight": (c.conv_dim, c.ssm_d_conv),
                f"{b}.ssm_dt.bias": (c.ssm_dt_rank,),
                f"{b}.ssm_a": (c.ssm_dt_rank,),  # -exp(A_log)
                f"{b}.ssm_beta.weight": (c.ssm_dt_rank, d),
                f"{b}.ssm_alpha.weight": (c.ssm_dt_rank, d),
                f"{b}.ssm_norm.weight": (c.ssm_d_state,),
                f"{b}.ssm_out.weight": (d, c.ssm_d_inner),
            })
        else:
            shapes.update(attention(b))
        shapes.update(ffn(b))
        if il >= c.n_layer:  # the MTP block: a full-attention block behind nextn.eh_proj
            shapes.update({f"{b}.nextn.eh_proj.weight": (d, 2 * d), f"{b}.nextn.enorm.weight": (d,),
                           f"{b}.nextn.hnorm.weight": (d,), f"{b}.nextn.shared_head_norm.weight": (d,)})
    return shapes


def shared_embedding(n_vocab: int, n_embd: int, seed: int) -> np.ndarray:
    """The token embedding of seed `seed`, shared by the qwen35 target and the llama draft."""
    rng = np.random.default_rng([seed, 35])
    return (rng.standard_normal((n_vocab, n_embd)) * EMBD_SCALE / np.sqrt(n_embd)).astype(np.float32)


def successor_head(embedding: np.ndarray, seed: int) -> np.ndarray:
    """An output head whose row y is the embedding row of a fixed random predecessor of y: where
    the hidden state is still close to token x's embedding, the favoured next token is succ(x), a
    random permutation (no repetition loops, unlike a tied head, which favours x itself)."""
    perm = np.random.default_rng([seed, 36]).permutation(len(embedding))
    return embedding[perm]


def random_qwen35_weights(c: Qwen35Config, seed: int) -> dict[str, np.ndarray]:
    """Weights that keep activations of order 1: norm gains 1, matrices N(0, 1/fan_in), the delta
    net's decay rates A = exp(-A_log) log-uniform in [0.02, 1] (per-token state decay from ~0.97 to
    ~0.27 with softplus(alpha + dt_bias) near 1.3; Hugging Face's init, A in [0, 16], forgets
    within a token or two), dt_bias 1 (Hugging Face's init), conv kernels N(0, 1/kernel)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in qwen35_shapes(c).items():
        if name in ("token_embd.weight", "output.weight"):
            embd = shared_embedding(c.n_vocab, c.n_embd, seed)
            out[name] = embd if name == "token_embd.weight" else successor_head(embd, seed)
        elif name.endswith(".ssm_a"):
            out[name] = -np.exp(rng.uniform(np.log(0.02), 0.0, shape))
        elif name.endswith(".ssm_dt.bias"):
            out[name] = np.ones(shape)
        elif name.endswith(".ssm_conv1d.weight"):
            out[name] = rng.standard_normal(shape) / np.sqrt(c.ssm_d_conv)
        elif len(shape) == 1:  # RMSNorm gains (llama.cpp stores Qwen's 1 + w)
            out[name] = np.ones(shape)
        elif name.endswith(".nextn.eh_proj.weight"):
            # The MTP block reads the embedding of the token after h's position and ignores h: with
            # small residuals it then predicts about what the trunk predicts one position later
            # (a draft that agrees often enough to test with).
            out[name] = np.concatenate([np.eye(c.n_embd), np.zeros((c.n_embd, c.n_embd))], axis=1)
        elif name.endswith(".ssm_alpha.weight"):
            out[name] = rng.standard_normal(shape) * 0.5 / np.sqrt(shape[1])
        else:
            out[name] = rng.standard_normal(shape) / np.sqrt(shape[1])
            if name.endswith((".attn_output.weight", ".ssm_out.weight", ".ffn_down.weight")):
                out[name] *= c.residual_scale
    return out


def n_vocab(family: Family = QWEN35_FAMILY, n_pad: int = 0) -> int:
    return len(vocab_tokens(family)) + n_pad


def build_qwen35(path, seed: int = 0, n_layer: int = 4, full_attention_interval: int = 4, n_embd: int = 64,
                 mtp: bool = False, n_pad: int = 0, family: Family = QWEN35_FAMILY, **config) -> Path:
    """Write a random qwen35 GGUF with `family`'s tokenizer; `config` overrides other Qwen35Config
    fields (n_ff, n_head, head_dim, ssm_*, tied_output, ...). Same arguments, same bytes."""
    import gguf

    c = Qwen35Config(n_vocab=n_vocab(family, n_pad), n_layer=n_layer, full_attention_interval=full_attention_interval,
                     n_embd=n_embd, mtp=mtp, **config)
    assert c.ssm_dt_rank % c.ssm_n_group == 0 and c.n_head % c.n_head_kv == 0
    assert 2 * sum(c.rope_sections) <= c.n_rot <= c.head_dim
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(f"cospec-qwen35-{n_layer}l{'-mtp' if mtp else ''}-s{seed}")
    for key, value in qwen35_hparams(c):
        if isinstance(value, list):
            writer.add_array(key, value)  # bools: BOOL, ints: INT32 (what llama.cpp's converter writes)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    add_family_tokenizer(writer, family, n_pad)
    for name, w in random_qwen35_weights(c, seed).items():
        dtype = np.float16 if name in ("token_embd.weight", "output.weight") else np.float32
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_llama_draft(path, seed: int = 0, n_layer: int = 1, n_pad: int = 0, tied_output: bool = True,
                      residual_scale: float = 1.0, family: Family = QWEN35_FAMILY) -> Path:
    """A llama-architecture draft (families' 64-wide config, F16 matrices) with the qwen35
    vocabulary and the token embedding of `build_qwen35(..., seed)` (default n_embd 64)."""
    from cospec_local.lab.testworld.gguf_export import random_llama_weights

    size = n_vocab(family, n_pad)
    config = family_config(size, n_layer)
    weights = random_llama_weights(config, seed)
    weights["token_embd.weight"] = shared_embedding(size, config.n_embd, seed)
    if not tied_output:
        weights["output.weight"] = successor_head(weights["token_embd.weight"], seed)
    for name in weights:
        if name.endswith((".attn_output.weight", ".ffn_down.weight")):
            weights[name] = weights[name] * residual_scale
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_family_model(path, family, weights, n_layer=n_layer, n_pad=n_pad)


class RawContext:
    """A bare llama.cpp context on a loaded llama_model (seq 0, no flash attention, 1 thread), for
    settings LlamaModel does not expose (n_rs_seq, the MTP context type)."""

    def __init__(self, model, n_rs_seq: int = 0, n_ctx: int = 256, n_batch: int = 8, **params):
        import llama_cpp as lib

        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, 1
        p.n_threads = p.n_threads_batch = 1
        p.n_rs_seq = n_rs_seq
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        for key, value in params.items():
            setattr(p, key, value)
        self.lib, self.model = lib, model
        self.ctx = lib.llama_init_from_model(model, p)
        assert self.ctx, "llama_init_from_model failed"
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))

    def decode(self, tokens, pos0: int) -> np.ndarray:
        """Decode `tokens` at positions pos0... in one call; a copy of the last row's logits."""
        lib = self.lib
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.logits[i] = i == len(tokens) - 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        rc = lib.llama_decode(self.ctx, batch)
        lib.llama_batch_free(batch)
        assert rc == 0, f"llama_decode: {rc}"
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    def prefill(self, tokens, chunk: int = 4) -> None:
        for i in range(0, len(tokens), chunk):
            self.decode(tokens[i:i + chunk], i)

    def seq_rm(self, p0: int) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.mem, 0, p0, -1))

    def pos_max(self) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.mem, 0))

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None


def rs_rollback_check(model, tokens, n_rs_seq: int = 4) -> dict:
    """llama.cpp's own rollback for recurrent layers (`n_rs_seq` snapshots): after decoding a
    prefix and then `plan` (token counts per decode call), remove positions >= prefix + keep and
    decode the next token; bit-identical to a context that never saw the removed tokens?

    The snapshots are the states after each of the last n_rs_seq + 1 tokens OF THE LAST DECODE
    CALL, so only removals that keep at least one token of that call are right. seq_rm checks
    only 1 <= removed <= n_rs_seq: it returns True for the others too and leaves a wrong state."""
    out: dict = {"n_rs_seq": n_rs_seq}
    prefix = tokens[:24]
    cont = list(range(1000, 1010))  # arbitrary continuation tokens
    ctx = RawContext(model, n_rs_seq=n_rs_seq)
    for plan, keep in (([5], 1), ([5], 4), ([3], 0), ([1], 0), ([1, 1, 1], 1), ([3, 1], 2), ([5], 0)):
        ctx.clear()
        ctx.prefill(prefix)
        pos = len(prefix)
        for n in plan:
            ctx.decode(cont[pos - len(prefix):pos - len(prefix) + n], pos)
            pos += n
        ok = ctx.seq_rm(len(prefix) + keep)
        res = {"seq_rm": ok}
        if ok:
            ref = RawContext(model)
            ref.prefill(prefix + cont[:keep])
            want = ref.decode([cont[keep]], len(prefix) + keep)
            ref.close()
            got = ctx.decode([cont[keep]], len(prefix) + keep)
            res["bit_identical"] = bool(np.array_equal(got, want))
        out[f"calls {plan} keep {keep}"] = res
    ctx.close()
    return out

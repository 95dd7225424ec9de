"""A PyTorch llama model that computes what llama.cpp computes for a `general.architecture = "llama"` GGUF.

RMSNorm, RoPE on ADJACENT pairs (2i, 2i+1) of each head (llama.cpp's rope type NORM for this
architecture), causal multi-head attention with optional grouped key/value heads, SwiGLU feed-forward,
tied or untied output head. Parameters are named after the GGUF tensors they become, so
`export_gguf` writes them without any permutation.

Requires torch (the `train` extra); import this module only where torch is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cospec_local.lab.testworld.gguf_export import CharVocab, LlamaConfig, write_llama_gguf


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.cpp's RMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(n_positions: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (n_positions, head_dim // 2): angle pos * base^(-2i/head_dim) for pair i."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (batch, heads, seq, head_dim) by the given angles."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated_even = x_even * cos - x_odd * sin
    rotated_odd = x_even * sin + x_odd * cos
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2)


class TorchLlama(nn.Module):
    """Llama model whose state_dict keys are GGUF tensor names with '.' replaced by '__'."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        config.check()
        self.config = config
        d, kv = config.n_embd, config.n_head_kv * config.head_dim
        self.weights = nn.ParameterDict()

        def add(name: str, *shape: int, std: float | None) -> None:
            tensor = torch.ones(shape) if std is None else torch.randn(shape) * std
            self.weights[name.replace(".", "__")] = nn.Parameter(tensor)

        add("token_embd.weight", config.n_vocab, d, std=1.0 / math.sqrt(d))
        add("output_norm.weight", d, std=None)
        if not config.tied_output:
            add("output.weight", config.n_vocab, d, std=1.0 / math.sqrt(d))
        # Residual output projections start smaller so that deep stacks begin near the identity.
        out_std = 1.0 / math.sqrt(2 * config.n_layer)
        for i in range(config.n_layer):
            add(f"blk.{i}.attn_norm.weight", d, std=None)
            add(f"blk.{i}.attn_q.weight", d, d, std=1.0 / math.sqrt(d))
            add(f"blk.{i}.attn_k.weight", kv, d, std=1.0 / math.sqrt(d))
            add(f"blk.{i}.attn_v.weight", kv, d, std=1.0 / math.sqrt(d))
            add(f"blk.{i}.attn_output.weight", d, d, std=out_std / math.sqrt(d))
            add(f"blk.{i}.ffn_norm.weight", d, std=None)
            add(f"blk.{i}.ffn_gate.weight", config.n_ff, d, std=1.0 / math.sqrt(d))
            add(f"blk.{i}.ffn_up.weight", config.n_ff, d, std=1.0 / math.sqrt(d))
            add(f"blk.{i}.ffn_down.weight", d, config.n_ff, std=out_std / math.sqrt(config.n_ff))
        cos, sin = rope_tables(config.n_ctx, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def w(self, gguf_name: str) -> torch.Tensor:
        """The parameter that becomes GGUF tensor `gguf_name`."""
        return self.weights[gguf_name.replace(".", "__")]

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, n_vocab) for token ids (batch, seq) starting at position 0."""
        cfg = self.config
        batch, seq = token_ids.shape
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = F.embedding(token_ids, self.w("token_embd.weight"))
        for i in range(cfg.n_layer):
            h = rms_norm(x, self.w(f"blk.{i}.attn_norm.weight"), cfg.rms_eps)
            q = (h @ self.w(f"blk.{i}.attn_q.weight").T).view(batch, seq, cfg.n_head, cfg.head_dim)
            k = (h @ self.w(f"blk.{i}.attn_k.weight").T).view(batch, seq, cfg.n_head_kv, cfg.head_dim)
            v = (h @ self.w(f"blk.{i}.attn_v.weight").T).view(batch, seq, cfg.n_head_kv, cfg.head_dim)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cfg.n_head_kv != cfg.n_head:  # grouped-query attention: share each k/v head
                repeat = cfg.n_head // cfg.n_head_kv
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            attn = attn.transpose(1, 2).reshape(batch, seq, cfg.n_embd)
            x = x + attn @ self.w(f"blk.{i}.attn_output.weight").T
            h = rms_norm(x, self.w(f"blk.{i}.ffn_norm.weight"), cfg.rms_eps)
            gated = F.silu(h @ self.w(f"blk.{i}.ffn_gate.weight").T) * (h @ self.w(f"blk.{i}.ffn_up.weight").T)
            x = x + gated @ self.w(f"blk.{i}.ffn_down.weight").T
        x = rms_norm(x, self.w("output_norm.weight"), cfg.rms_eps)
        head = self.w("token_embd.weight") if cfg.tied_output else self.w("output.weight")
        return x @ head.T

    def numpy_weights(self) -> dict[str, np.ndarray]:
        """GGUF tensor name -> float32 array, ready for `write_llama_gguf`."""
        return {key.replace("__", "."): value.detach().cpu().float().numpy()
                for key, value in self.weights.items()}

    def export_gguf(self, path: str | Path, vocab: CharVocab, name: str = "cospec-testworld") -> Path:
        """Write this model as a llama GGUF with the character tokenizer `vocab`."""
        return write_llama_gguf(path, self.numpy_weights(), self.config, vocab, name=name)

    def num_parameters(self) -> int:
        """Number of parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

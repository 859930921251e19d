"""The Qwen2 decoder the Qwen2-VL family uses as its language model, over a paged KV cache.

Tokens of all sequences in a step are flattened into one [tokens, hidden] batch; only
attention needs to know where sequences start and end (from the forward context).
Module names follow the HF checkpoint; q/k/v and gate/up are fused (see `PACKED_MODULES`).
"""

from __future__ import annotations

import torch
from torch import nn

from epd.models.config import TextConfig
from epd.models.layers.activation import SiluAndMul
from epd.models.layers.attention import PagedAttention
from epd.models.layers.linear import MergedLinear
from epd.models.layers.norm import RMSNorm
from epd.models.layers.rotary import MRotaryEmbedding, apply_rotary


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        self.q_size, self.kv_size = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, [("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size)], bias=True
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(cfg.num_attention_heads, cfg.num_key_value_heads, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[0], self.attn.head_dim
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(n, -1, d), cos, sin)
        k = apply_rotary(k.view(n, -1, d), cos, sin)
        out = self.attn(q, k, v.view(n, -1, d))
        return self.o_proj(out.reshape(n, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"Qwen2 MLP supports silu, got {cfg.hidden_act!r}")
        size = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [(0, size), (1, size)], bias=False)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = MRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [tokens, hidden], positions [3, tokens] -> final hidden states."""
        cos, sin = self.rotary_emb(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

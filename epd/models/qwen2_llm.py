"""The Qwen2 decoder the Qwen2-VL family uses as its language model, over a paged KV cache.
Qwen3-VL's Qwen3 decoder is the same with three switches of `TextConfig`: no q/k/v bias,
an RMSNorm over each q and k head before the rotation (`qk_norm`), and interleaved M-RoPE.

Tokens of all sequences in a step are flattened into one [tokens, hidden] batch; only
attention needs to know where sequences start and end (from the forward context).
Module names follow the HF checkpoint; q/k/v and gate/up are fused (see `PACKED_MODULES`).

Layers pass (output, residual) rather than the running sum, so that each residual add runs
inside the RMSNorm that follows it (`fused.add_rms_norm`: one kernel on the GPU, where the
adds were two of a decode step's ~12 launches a layer). The sums are the same as HF's
`x = x + sublayer(norm(x))`, in the same order.

Built inside `epd.parallel.context.building_rank` (a tensor-parallel rank), each attention layer
holds only its rank's heads (and their KV) and each MLP its share of the columns; o_proj and
down_proj then give partial sums, which one all-reduce per sublayer adds (epd.parallel). On a
single device the layers are the plain ones and the all-reduce is one `is None` test.

`after_each_layer` lets a caller act between layers (a prefill instance sends each layer's
KV as soon as it is written); unset, it costs one `is None` test per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from epd.models.config import TextConfig
from epd.models.layers import fused
from epd.models.layers.activation import SiluAndMul
from epd.models.layers.attention import PagedAttention
from epd.models.layers.norm import RMSNorm
from epd.models.layers.rotary import MRotaryEmbedding, apply_rotary
from epd.parallel.context import building_group
from epd.parallel.linear import ColumnShard, heads_of_rank, merged_column_linear, row_parallel_linear


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        self.tp = building_group()  # None on a single device
        heads = heads_of_rank(cfg.num_attention_heads, cfg.num_key_value_heads)
        self.q_size, self.kv_size = heads.num_heads * d, heads.num_kv_heads * d
        q_size, kv_size = cfg.num_attention_heads * d, cfg.num_key_value_heads * d  # all heads'
        shards = [ColumnShard("q", q_size)] + [ColumnShard(n, kv_size, heads.kv_pieces) for n in "kv"]
        self.qkv_proj = merged_column_linear(cfg.hidden_size, shards, bias=cfg.attention_bias)
        self.o_proj = row_parallel_linear(q_size, cfg.hidden_size)
        self.attn = PagedAttention(heads.num_heads, heads.num_kv_heads, d)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # Qwen3
            self.q_norm, self.k_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[0], self.attn.head_dim
        qkv = fused.linear(x, self.qkv_proj)
        q, k = self._rotate(qkv, cos, sin)
        out = self.attn(q, k, qkv[:, self.q_size + self.kv_size :].view(n, -1, d))
        out = fused.linear(out.reshape(n, -1), self.o_proj)
        return out if self.tp is None else self.tp.all_reduce(out)  # the ranks' heads' sum

    def _rotate(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k, rotated. Their heads sit side by side in qkv's rows, so the fused kernel
        rotates both in one launch; the torch path rotates each (the CPU reference)."""
        n, d, heads = qkv.shape[0], self.attn.head_dim, self.attn.num_heads
        if self.q_norm is not None:
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
            q, k = self.q_norm(q.reshape(n, -1, d)), self.k_norm(k.reshape(n, -1, d))
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if fused.use_fused(qkv):
            qk = fused.ops().rotary(qkv[:, : self.q_size + self.kv_size].view(n, -1, d), cos, sin)
            return qk[:, :heads], qk[:, heads:]
        q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
        return apply_rotary(q.view(n, -1, d), cos, sin), apply_rotary(k.view(n, -1, d), cos, sin)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"Qwen2 MLP supports silu, got {cfg.hidden_act!r}")
        size = cfg.intermediate_size
        self.tp = building_group()  # None on a single device
        self.gate_up_proj = merged_column_linear(
            cfg.hidden_size, [ColumnShard(0, size), ColumnShard(1, size)], bias=False
        )
        self.act = SiluAndMul()
        self.down_proj = row_parallel_linear(size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fused.linear(self.act(fused.linear(x, self.gate_up_proj)), self.down_proj)
        return out if self.tp is None else self.tp.all_reduce(out)  # the ranks' columns' sum


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous layer's MLP output, residual stream before it) -> the same for this layer.

        The first layer gets (embeddings, None): nothing to add yet.
        """
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = fused.add_rms_norm(x, residual, self.input_layernorm)
        x = self.self_attn(x, cos, sin)
        x, residual = fused.add_rms_norm(x, residual, self.post_attention_layernorm)
        return self.mlp(x), residual


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = MRotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved
        )
        self._after_layer: Callable[[int], None] | None = None

    @contextmanager
    def after_each_layer(self, hook: Callable[[int], None]) -> Iterator[None]:
        """Call `hook(i)` right after layer i has run, in the forwards inside this block.

        Eager forwards only: a CUDA graph replays kernels, not Python, so a hook set while a
        graph is captured or replayed would never run (decode graphs are captured without one).
        """
        if self._after_layer is not None:
            raise RuntimeError("a layer hook is already set: hooks do not nest")
        self._after_layer = hook
        try:
            yield
        finally:
            self._after_layer = None

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [tokens, hidden], positions [3, tokens] -> final hidden states."""
        cos, sin = self.rotary_emb(positions, inputs_embeds.dtype)
        x, residual = inputs_embeds, None
        hook = self._after_layer
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin)
            if hook is not None:
                hook(i)
        return fused.add_rms_norm(x, residual, self.norm)[0]

"""Llama family: Llama 2/3, SmolLM2, TinyLlama, Mistral (without sliding window)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tandem.attention.layer import Attention
from tandem.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tandem.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tandem.layers.norm import RMSNorm
from tandem.layers.rotary import RotaryEmbedding, apply_rotary


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config) -> dict:
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return dict(rope)
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **(config.rope_scaling or {})}


class LlamaAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool):
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=o_bias)
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim)

    def forward(self, step: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        heads = self.num_heads + self.num_kv_heads
        qk_size = heads * self.head_dim
        qkv = self.qkv_proj(x)
        # Queries and keys rotate as one tensor: half the small ops of doing each apart.
        qk = apply_rotary(qkv[:, :qk_size].view(-1, heads, self.head_dim), step[:2])
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        o = self.attn(q, k, qkv[:, qk_size:].view(-1, self.num_kv_heads, self.head_dim),
                      step[2:])
        return self.o_proj(o.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, biases: tuple[bool, bool]):
        super().__init__()
        self.self_attn = LlamaAttention(config, *biases)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, step: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        # The residual stream in, the residual stream out: one signature for every layer, so
        # torch.compile traces the decoder layer once (see engine/compile.py). `step`: the
        # rows' rotary (cos, sin), then a compiled decode-only step's attention inputs
        # (Attention.forward).
        x = x + self.self_attn(step, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config, biases: tuple[bool, bool]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                          rope_parameters(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, biases)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                decode: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        step = self.rotary_emb(positions) + decode  # once a step, not once a layer
        for layer in self.layers:
            x = layer(step, x)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our parameter, shard id) for projections we store merged
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.biases(config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias)."""
        bias = getattr(config, "attention_bias", False)
        return bias, bias

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                decode: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        return self.model(input_ids, positions, decode)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)

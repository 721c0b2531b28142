"""Per-step attention inputs, built once by the model runner and read by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSeq:
    q_start: int  # first row of this sequence's queries in the flat batch
    q_len: int
    context_len: int  # cached plus new tokens the queries attend to
    block_table: torch.Tensor  # [ceil(context_len / block_size)]
    mask: torch.Tensor | None = None  # [q_len, context_len] causal past cached tokens (0/-inf)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]: where each new token's K/V is written
    num_decode: int = 0  # the flat batch starts with this many one-token decodes
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks], padded
    decode_lens: torch.Tensor | None = None  # [num_decode]: tokens each decode attends to
    decode_mask: torch.Tensor | None = None  # [1, num_decode, 1, max_blocks * block_size], 0/-inf
    prefills: list[PrefillSeq] = field(default_factory=list)


_current: AttentionMetadata | None = None


def set_metadata(meta: AttentionMetadata | None) -> None:
    # One global per step, as in nano-vllm, instead of threading it through every layer.
    global _current
    _current = meta


def get_metadata() -> AttentionMetadata:
    assert _current is not None, "attention called outside a model step"
    return _current

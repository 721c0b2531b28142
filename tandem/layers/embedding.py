"""Vocabulary split across tensor-parallel ranks, for the embedding and the LM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.distributed.parallel_state import all_reduce, gather_to_first, tp_rank, tp_size
from tandem.layers.linear import copy_into, divide, matmul
from tandem.quantization.q8_0 import BLOCK as Q8_BLOCK
from tandem.quantization.weight import Q8Weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard = divide(vocab_size, tp_size(), "vocabulary size")
        self.start = tp_rank() * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.dtype = self.weight.dtype
        self.quant: Q8Weight | None = None
        self.quantize_to: tuple[str, int] | None = None

    def expect_quantized(self, method: str, group_size: int) -> None:
        """A Q8_0 table (int8, a scale per 32) whatever `method`: the LM head loses too much to
        coarser ones (teacher-forced top-1 against float32: 4-bit groups of 32 86%, int8 with
        one scale a row 96.7%; docs/quantization.md)."""
        self.quantize_to = ("q8_0", Q8_BLOCK)

    def expect_q8_0(self) -> None:
        """Load this rank's rows of a GGUF's Q8_0 codes and scales instead of the weight."""
        rows, cols = self.weight.shape
        del self.weight
        for name, width, dtype in (("q8codes", cols, torch.int8),
                                   ("q8scale", cols // Q8_BLOCK, torch.float32)):
            param = nn.Parameter(torch.empty(rows, width, dtype=dtype), requires_grad=False)
            param.weight_loader = self.weight_loader
            self.register_parameter(name, param)

    def finish_loading(self, dense_dtype: torch.dtype | None = None) -> None:
        if hasattr(self, "q8codes"):
            self.quant = Q8Weight(self.q8codes.data, self.q8scale.data)
            del self.q8codes, self.q8scale
        else:
            self.quant = Q8Weight.quantize(self.weight.data)
            del self.weight

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.rows(ids, self.dtype)
        return F.embedding(ids, self.weight)

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        copy_into(param, loaded, self.start)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return self.lookup(ids)
        local = ids - self.start
        mask = (local >= 0) & (local < self.shard)
        y = self.lookup(local.clamp(0, self.shard - 1)) * mask.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.lowp: torch.Tensor | None = None  # add_decode_copies fills it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0 (None elsewhere)."""
        logits = (self.quant(hidden) if self.quant is not None
                  else matmul(hidden, self.weight, self.lowp))
        return gather_to_first(logits, dim=-1)

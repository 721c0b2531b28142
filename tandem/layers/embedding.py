"""Vocabulary split across tensor-parallel ranks, for the embedding and the LM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.distributed.parallel_state import all_reduce, gather_to_first, tp_rank, tp_size
from tandem.layers.linear import copy_into, divide, matmul


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard = divide(vocab_size, tp_size(), "vocabulary size")
        self.start = tp_rank() * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        copy_into(param, loaded, self.start)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.shard)
        y = F.embedding(local.clamp(0, self.shard - 1), self.weight) * mask.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.lowp: torch.Tensor | None = None  # add_decode_copies fills it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0 (None elsewhere)."""
        return gather_to_first(matmul(hidden, self.weight, self.lowp), dim=-1)

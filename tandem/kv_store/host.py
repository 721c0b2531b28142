"""The host-memory tier: a second pool of KV blocks, named by block hash, least recently used
first out. On CUDA it is pinned, so copies to and from the device pool are plain DMA; on the
CPU it is simply more memory, outside the pool the scheduler allocates from."""
from __future__ import annotations

from collections import OrderedDict

import torch


class HostPool:
    def __init__(self, num_blocks: int, kv_shape: tuple[int, ...], dtype: torch.dtype,
                 scale_dtype: torch.dtype | None, pin: bool):
        self.num_blocks = num_blocks
        self.kv = torch.zeros((num_blocks, *kv_shape), dtype=dtype, pin_memory=pin)
        self.scale = (torch.zeros((num_blocks, *kv_shape[:-1]), dtype=scale_dtype,
                                  pin_memory=pin) if scale_dtype is not None else None)
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self.free = list(range(num_blocks - 1, -1, -1))

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def block_bytes(self) -> int:
        n = self.kv[0].numel() * self.kv.element_size()
        return n + (self.scale[0].numel() * self.scale.element_size() if self.scale is not None
                    else 0)

    def put(self, block_hash: bytes, kv: torch.Tensor, scale: torch.Tensor | None
            ) -> tuple[bytes, torch.Tensor, torch.Tensor | None] | None:
        """Keep a copy of one block; returns the entry it evicted to make room (its data
        copied out, for the tier below), or None."""
        if block_hash in self.slots:
            self.slots.move_to_end(block_hash)
            return None
        evicted = None
        if not self.free:
            old, slot = self.slots.popitem(last=False)
            evicted = (old, self.kv[slot].clone(),
                       self.scale[slot].clone() if self.scale is not None else None)
            self.free.append(slot)
        slot = self.free.pop()
        self.kv[slot].copy_(kv)
        if self.scale is not None:
            self.scale[slot].copy_(scale)
        self.slots[block_hash] = slot
        return evicted

    def get(self, block_hash: bytes) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The block's data (views into the pool, valid until the next put), as most recently
        used; None if it is not here."""
        slot = self.slots.get(block_hash)
        if slot is None:
            return None
        self.slots.move_to_end(block_hash)
        return self.kv[slot], self.scale[slot] if self.scale is not None else None

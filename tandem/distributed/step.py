"""One step's model inputs as int64 tensors, and their broadcast from rank 0 to the workers.

Rank 0 schedules; every rank runs the same forward pass. What a worker needs is the flat batch
and what the attention metadata is built from, nothing else, sent as two broadcasts: a fixed
header (command and sizes), then every field packed into one tensor. No pickle.

The KV tiers add two commands (kv_store/tiers.py): TIER_OPS, the tier operations rank 0 ran
since the last broadcast, as JSON, for every rank to repeat on its own heads in the same order;
and LOADED, after which every rank all-reduces how many blocks of a store load it holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

STEP, KEEPALIVE, STOP, TIER_OPS, LOADED = 0, 1, 2, 3, 4
_HEADER = 8


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat KV slot of each new token
    decode_tables: torch.Tensor  # [num_decode, width] block ids, zero-padded
    decode_lens: torch.Tensor  # [num_decode] context length of each decode
    prefills: torch.Tensor  # [P, 3]: first row in the batch, tokens in this chunk, cached before
    prefill_tables: torch.Tensor  # the P block tables, concatenated
    sample_rows: torch.Tensor  # [S] rows whose logits are sampled
    prompt_rows: torch.Tensor  # [R] prompt positions' rows whose logits give prompt logprobs

    _FIELDS = ("input_ids", "positions", "slots", "decode_tables", "decode_lens", "prefills",
               "prefill_tables", "sample_rows", "prompt_rows")

    def sizes(self) -> list[int]:
        return [self.input_ids.numel(), self.decode_tables.shape[0], self.decode_tables.shape[1],
                self.prefills.shape[0], self.prefill_tables.numel(), self.sample_rows.numel(),
                self.prompt_rows.numel()]

    def pack(self) -> torch.Tensor:
        return torch.cat([getattr(self, f).reshape(-1) for f in self._FIELDS])

    @classmethod
    def unpack(cls, flat: torch.Tensor, sizes: list[int]) -> StepInputs:
        t, nd, width, p, nt, s, r = sizes
        shapes = [(t,), (t,), (t,), (nd, width), (nd,), (p, 3), (nt,), (s,), (r,)]
        parts, at = [], 0
        for shape in shapes:
            n = 1
            for d in shape:
                n *= d
            parts.append(flat[at:at + n].view(shape))
            at += n
        return cls(*parts)


def send(cmd: int, inputs: StepInputs | None, device: torch.device,
         args: tuple[int, ...] = ()) -> None:
    """Rank 0: tell every worker what to do next."""
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = cmd
    if inputs is not None:
        header[1:8] = torch.tensor(inputs.sizes())
    header[1:1 + len(args)] = torch.tensor(args, dtype=torch.int64)
    dist.broadcast(header.to(device), 0)
    if inputs is not None:
        dist.broadcast(inputs.pack().to(device), 0)


def send_tier_ops(ops: list[list], device: torch.device) -> None:
    data = json.dumps(ops, separators=(",", ":")).encode()
    send(TIER_OPS, None, device, (len(data),))
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), 0)


def receive(device: torch.device) -> tuple[int, Any]:
    """Workers: the next command and what comes with it: a step's inputs (on `device`), the
    tier operations, or a load's (id, seconds to wait for it); else None."""
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, 0)
    header = header.tolist()
    if header[0] == TIER_OPS:
        data = torch.empty(header[1], dtype=torch.uint8, device=device)
        dist.broadcast(data, 0)
        return TIER_OPS, json.loads(data.cpu().numpy().tobytes())
    if header[0] == LOADED:
        return LOADED, (header[1], header[2] / 1000)
    if header[0] != STEP:
        return header[0], None
    sizes = header[1:8]
    total = (sizes[0] * 3 + sizes[1] * sizes[2] + sizes[1] + sizes[3] * 3 + sizes[4] + sizes[5]
             + sizes[6])
    flat = torch.empty(total, dtype=torch.int64, device=device)
    dist.broadcast(flat, 0)
    return STEP, StepInputs.unpack(flat, sizes)

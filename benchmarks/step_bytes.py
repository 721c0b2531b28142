"""Bytes a one-row decode step of Tandem reads, counted from the model as loaded.

The roofline of single-stream decode divides these by memory bandwidth. What a step reads
depends on how the weights are served, not just on --dtype: a quantized projection or LM head
(--quantization gguf/int4/int8) reads its codes and scales, even where --dense-weight-copy
keeps a dense copy too (that copy serves steps of many rows only); a 16-bit decode copy
(--decode-weight-dtype) replaces the dense weight it copies; otherwise the weight itself.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc

import torch
from torch import nn

from tandem import LLM
from tandem.cli import build_parser
from tandem.config import EngineConfig
from tandem.layers.linear import LinearBase
from tandem.layers.norm import RMSNorm

SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int8: "int8"}
# tandem.quantization.weight's classes, by name (another kind shows as its class name)
QUANT_KINDS = {"Int4Weight": "4-bit", "Int8Weight": "int8", "Q8Weight": "Q8_0"}


def read_by_step(m: nn.Module) -> tuple[str, tuple[torch.Tensor, ...]]:
    """What a one-row step through projection or LM head `m` reads, and a name for its kind."""
    quant = getattr(m, "quant", None)
    if quant is not None:
        kind = QUANT_KINDS.get(type(quant).__name__, type(quant).__name__)
        tensors = quant.tensors
        if getattr(quant, "avx2_scale", None) is not None:  # the AVX2 kernel's float16 scales
            tensors = (quant.codes, quant.avx2_scale)
        elif getattr(quant, "f16", None) is not None:  # few rows read the float16 copy only
            kind, tensors = "f16", (quant.f16,)
    elif getattr(m, "lowp", None) is not None:
        kind, tensors = SHORT.get(m.lowp.dtype, str(m.lowp.dtype)), (m.lowp,)
    else:
        kind, tensors = SHORT.get(m.weight.dtype, str(m.weight.dtype)), (m.weight,)
    bias = getattr(m, "bias", None)
    return kind, (*tensors, *([bias] if isinstance(bias, torch.Tensor) else []))


def step_bytes(model: nn.Module) -> tuple[str, int]:
    """(what the weights are, e.g. '4-bit projections + f16 LM head' or 'bf16 throughout';
    the bytes a step reads): every projection, the LM head and the norms. The embedding lookup
    reads one row, left out; a tensor two modules share (a tied table) counts once."""
    head = model.lm_head
    kinds: dict[str, set[str]] = {"projections": set(), "LM head": set()}
    tensors: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, LinearBase) or m is head:
            kind, ts = read_by_step(m)
            kinds["LM head" if m is head else "projections"].add(kind)
            tensors += ts
        elif isinstance(m, RMSNorm):
            tensors.append(m.weight)
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}
    total = sum(t.numel() * t.element_size() for t in unique.values())
    names = {part: "/".join(sorted(k)) for part, k in kinds.items() if k}
    if len(set(names.values())) == 1:
        return f"{next(iter(names.values()))} throughout", total
    return " + ".join(f"{k} {part}" for part, k in names.items()), total


def tandem_step_bytes(serve_args: list[str], model: str = "smollm2") -> tuple[str, int]:
    """step_bytes of `tandem serve --model model *serve_args`, loaded in this process (eager,
    a small KV cache) and freed again before returning, its memory handed back to the OS."""
    cfg = EngineConfig.from_args(build_parser().parse_args(
        ["serve", "--model", model, *serve_args]))
    kwargs = dataclasses.asdict(cfg) | {"kv_cache_memory": "16MiB", "enforce_eager": True}
    llm = LLM(**kwargs)
    try:
        return step_bytes(llm.engine.runner.model)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed pages otherwise
            ctypes.CDLL("libc.so.6").malloc_trim(0)

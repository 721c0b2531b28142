"""GGUF Q4_0 / Q4_1 blocks -> int4.py's codes, scales and zeros, read as stored (not requantized).

A block covers 32 consecutive elements of a row: an fp16 d (Q4_1: then an fp16 m) and 16 bytes,
byte j holding element j in its low nibble and element j + 16 in its high one.
  Q4_0: x = d * (q - 8)  ->  scale = d, zero = 0
  Q4_1: x = d * q + m    ->  scale = d, zero = m + 8 d   (int4.py: x = (q - 8) * scale + zero)
"""

import gguf
import numpy as np
import torch

SUPPORTED = ("Q4_0", "Q4_1")
BLOCK = 32  # elements per block, so the group size these tensors serve with


def q4_codes(name: str, raw: np.ndarray, qtype: gguf.GGMLQuantizationType,
             shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`raw`: the tensor's bytes as `GGUFReader(...).tensors[i].data` gives them, uint8
    [N, K // 32 * block bytes]; `shape`: (N rows, K columns) in PyTorch order, i.e. the reader's
    `tensor.shape` reversed. Returns (codes uint8 [N, K], scale and zero float32 [N, K // 32])."""
    if qtype.name not in SUPPORTED:
        raise ValueError(f"{name}: GGUF type {qtype.name} is not supported for 4-bit serving; "
                         f"supported: {', '.join(SUPPORTED)}")
    n, k = shape
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]  # 18 for Q4_0, 20 for Q4_1
    if k % BLOCK or raw.size != n * (k // BLOCK) * block_bytes:
        raise ValueError(f"{name}: {raw.size} bytes of {qtype.name} do not hold a {shape} tensor")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, block_bytes)
    header = blocks[..., : block_bytes - BLOCK // 2].copy().view(np.float16).astype(np.float32)
    scale = np.ascontiguousarray(header[..., 0])
    zero = header[..., 1] + 8 * scale if qtype.name == "Q4_1" else np.zeros_like(scale)
    nibbles = blocks[..., block_bytes - BLOCK // 2:]
    codes = np.concatenate((nibbles & 15, nibbles >> 4), axis=-1).reshape(n, k)
    return torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(zero)

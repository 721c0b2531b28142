"""Tandem's CPU kernels for 4-bit and Q8_0 weights where ATen runs its AVX2 path, and for the
Q8_0 LM head's many-row steps with AVX-512 (avx2_kernels.cpp; see wanted()).

Why they exist (ARCHITECTURE.md allows hand-written kernels for a measured gap): ATen's int4
kernel runs its AVX2 path at 2.2x its AVX-512 time, 5.5 ms of a one-row SmolLM2 step against
2.5; neither Inductor's dequantize-then-matmul nor ATen's int8 kernel closes it; and Inductor's
kernel for the Q8_0 LM head is not vectorized under AVX2 (22 ms at one row against 2.7), so
that head needed a float16 copy (BENCHMARKS.md, issue 14). These kernels multiply the codes with
activations rounded to int16, one scale a row, by AVX2's 16-bit integer dot product (vpmaddwd),
then apply each group's float16 scale (and min) in float32: w = code * scale (+ min). Rounding
x to 16 bits is finer than the bfloat16 ATen's kernel rounds it to (error at most 2^-16 of the
row's largest value). Groups of 32; for 4 bits K a multiple of 64, as a 32-byte load holds 64
weights (pack_int4()).

Built on first use with the C++ compiler Inductor uses (g++, or $CXX), against this torch, into
$TANDEM_CACHE/kernels/ (6.5 s on 2 cores, once per source, torch version and compiler). Where
the build fails, ATen's and Inductor's kernels serve and a warning says why.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tandem.config import cpu_flags, cpu_isa
from tandem.loader.model_path import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("avx2_kernels.cpp")
GROUP = 32
CHUNK = 64  # weights per 32-byte load: K must be a multiple of it
# TANDEM_CPU_KERNELS=torch|avx2 overrides the choice by ISA (auto), so that one machine can
# run either set of kernels (tests, benchmarks). torch: ATen's int4 kernel and, for the Q8_0 LM
# head, prepare_q8's routes (tandem/quantization/weight.py).
KERNELS = ("auto", "torch", "avx2")
NEEDS = ("avx2", "fma", "f16c")


def wanted(isas: tuple[str, ...] = ("AVX2",)) -> bool:
    """Whether to use these kernels where ATen's CPU capability is one of `isas`: 4-bit layers
    and the Q8_0 LM head take them on AVX2; the head also on AVX-512, above the rows Inductor's
    kernel serves (weight.prepare_q8)."""
    choice = os.environ.get("TANDEM_CPU_KERNELS", "auto")
    if choice not in KERNELS:
        raise ValueError(f"TANDEM_CPU_KERNELS: must be one of {', '.join(KERNELS)}, "
                         f"got {choice!r}")
    if choice == "torch":
        return False
    if choice == "avx2":
        missing = [f for f in NEEDS if f not in cpu_flags()]
        if missing:
            raise ValueError(f"TANDEM_CPU_KERNELS=avx2: this CPU lacks {', '.join(missing)}")
        return load()
    return cpu_isa() in isas and all(f in cpu_flags() for f in NEEDS) and load()


def fits_int4(n: int, k: int, group_size: int) -> bool:
    return group_size == GROUP and k % CHUNK == 0 and n % 16 == 0


@functools.cache
def load() -> bool:
    """Build (once per source, torch and compiler) and load the ops; False, with a warning, if
    that fails."""
    torch_dir = Path(torch.__file__).parent
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    cxx = os.environ.get("CXX", "g++")
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                         + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"avx2_kernels-{key}.so"
    try:
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            # Several processes (TP ranks, replicas) may build at once: each writes its own file
            # and renames it into place, which is atomic.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            cmd = [cxx, *flags,
                   f"-I{torch_dir / 'include'}",
                   f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
                   str(SOURCE), "-o", tmp, f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
                   f"-Wl,-rpath,{torch_dir / 'lib'}"]
            start = time.perf_counter()
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
                os.replace(tmp, lib)
                log.info("built the AVX2 kernels in %.1f s: %s", time.perf_counter() - start, lib)
            finally:
                Path(tmp).unlink(missing_ok=True)
        torch.ops.load_library(str(lib))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        log.warning("AVX2 kernels unavailable, ATen's and Inductor's serve instead: %s",
                    detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__)
        return False

    for op in ("tandem_cpu::int4_mm", "tandem_cpu::q8_0_mm"):  # for torch.compile's tracing
        torch.library.register_fake(op)(
            lambda x, codes, scale: x.new_empty(x.shape[0], codes.shape[0]))
    return True


def pack_int4(codes: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 uint8 [N, K], scale and zero [N, K // 32] in int4.py's convention
    (w = (code - 8) * scale + zero) -> (codes uint8 [N, K // 2], scale_min float16 [2, N, K // 32])
    for int4_mm. A GGUF's fp16 scales and mins survive exactly; int4's float32 ones round to
    float16."""
    n, k = codes.shape
    c = codes.view(n, k // CHUNK, 4, 16).to(torch.int32)
    lanes = c[:, :, 0] | c[:, :, 1] << 4 | c[:, :, 2] << 8 | c[:, :, 3] << 12
    packed = lanes.to(torch.uint16).view(torch.uint8).reshape(n, k // 2).contiguous()
    scale_min = torch.stack((scale.float(), zero.float() - 8 * scale.float()))
    return packed, scale_min.to(torch.float16).contiguous()


def int4_mm(x: torch.Tensor, codes: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T -> [M, N] in x.dtype (computed from float32 x)."""
    return torch.ops.tandem_cpu.int4_mm(x.float().contiguous(), codes, scale_min).to(x.dtype)


def q8_0_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (codes * scale per 32).T -> [M, N] in x.dtype; codes int8 [N, K] as stored,
    scale float16 [N, K // 32] (a GGUF's fp16 d, exactly)."""
    return torch.ops.tandem_cpu.q8_0_mm(x.float().contiguous(), codes, scale).to(x.dtype)

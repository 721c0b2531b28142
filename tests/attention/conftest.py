"""Triton's interpreter for the GPU kernels under test here, set up before they are imported."""
import os

import numpy as np

# Read when a kernel is decorated (at import); the engine also checks it for a CPU run.
os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language as tl
from triton.runtime import interpreter

_create_dot = interpreter.InterpreterBuilder.create_dot


def _widen_bf16(x: interpreter.TensorHandle) -> interpreter.TensorHandle:
    if x.dtype != tl.bfloat16:
        return x
    return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32),
                                    tl.float32)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc, _dot=_create_dot):
    # The interpreter (3.7 to 3.9 at least) holds bfloat16 as uint16 bits, NumPy having no
    # bfloat16, and tl.dot multiplies those bits as integers. Widened to float32 (exact), the
    # products are what a GPU's bfloat16 MMA computes, accumulated in float32.
    return _dot(self, _widen_bf16(a), _widen_bf16(b), d, input_precision, max_num_imprecise_acc)


interpreter.InterpreterBuilder.create_dot = _create_dot

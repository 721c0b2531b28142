"""torch.compile (Inductor) of the decoder layers, warmed up before the engine serves.

Regional compilation: the decoder layer's forward is traced once and every layer runs the
result (parameters are graph inputs; attention is the opaque `tandem::attention` op): ~20 s
for SmolLM2 on 2 cores, where the whole model took 135 s. A step that only decodes traces its
attention into the graph instead (attention/paged_decode.py). Only the first layer of a step
goes through Dynamo (layer_dispatch.py). Inductor's artifacts are cached
under $TANDEM_CACHE/inductor, so a second start skips code generation (~3 s).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

import torch

from tandem.attention.metadata import set_metadata
from tandem.distributed.parallel_state import tp_size
from tandem.distributed.step import StepInputs
from tandem.engine.layer_dispatch import DispatchMismatch, LayerDispatch, backend
from tandem.loader.model_path import cache_root

if TYPE_CHECKING:
    from tandem.config import EngineConfig
    from tandem.engine.model_runner import ModelRunner

logger = logging.getLogger("tandem.compile")
# Inductor's wrapper checks every input's size and alignment on every call: ~6 us a layer.
OPTIONS = {"size_asserts": False, "alignment_asserts": False}
# One backend object for every layer and engine in the process: Dynamo reuses a graph only
# under the backend that compiled it.
BACKEND = backend(OPTIONS)


def compile_model(runner: ModelRunner, config: EngineConfig) -> bool:
    """Compile the runner's decoder layers and warm them up; False, with the layers left
    eager, under --enforce-eager, off the CPU, with tensor parallelism (whose all_reduce
    inside the layer Dynamo would have to trace as a functional collective over gloo), or when
    Dynamo cannot compile them."""
    if config.enforce_eager or runner.device.type != "cpu" or tp_size() > 1:
        return False
    # Read at Inductor's first compile in this process, unless something set it before.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    # Dynamo's default of 8 graphs a function: one engine's warm-up makes up to 6 of the
    # shared layer code (steps with and without prefills, by row range), a draft model's as
    # many again.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    layers = runner.model.model.layers
    for layer in layers:
        layer.compile(fullgraph=True, backend=BACKEND)
    dispatch = LayerDispatch(layers)
    try:
        warm_up(runner, dispatch, config.max_num_batched_tokens)
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.FailOnRecompileLimitHit,
            DispatchMismatch) as e:
        # A graph break, other engines in this process used up Dynamo's graphs for the layer
        # code, or a graph called directly disagreed with Dynamo's call of it.
        logger.warning("torch.compile: running the decoder layers eagerly: %r", e)
        for layer in layers:
            layer._compiled_call_impl = None
        return False
    return True


def step_stance(compiled: bool) -> contextlib.AbstractContextManager:
    """What a compiled model's forward pass runs under. The warm-up met every graph a step can
    need, so Dynamo may check only the guards that tell those graphs apart, not all ~150
    (module structure, globals, each input's dtype and strides) on each of a step's 30 layer
    calls: 1 ms of a 1-row step. A step needing another graph would raise, not compile. Only
    around the model, as torch.compile elsewhere in the process must still compile."""
    if not compiled:
        return contextlib.nullcontext()
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


@torch.inference_mode()
def warm_up(runner: ModelRunner, dispatch: LayerDispatch, max_rows: int) -> None:
    """Run the first layer on steps of 1, 2, 4 ... max_rows one-token decodes and on max_rows
    itself, so that Dynamo meets every branch the layer takes on the number of rows now, not on
    a request: the projections' routes switch at powers of two (linear.py), and every range
    between two switches holds one of these sizes. One layer suffices: all share its code. The
    second layer runs each graph as the step's other layers do (layer_dispatch.py), and must
    give what Dynamo gives."""
    model = runner.model.model
    sizes = [1 << i for i in range(max_rows.bit_length())]
    for n in sizes + [max_rows] * (sizes[-1] != max_rows):
        zeros = torch.zeros(n, dtype=torch.int64, device=runner.device)
        none = zeros[:0]
        # Every row writes slot 0 and reads block 0, which is zeroed again below.
        inp = StepInputs(zeros, zeros, zeros, zeros.view(n, 1), zeros + 1, none.view(0, 3),
                         none, none, none)
        meta = runner.metadata(inp)
        set_metadata(meta)
        try:
            rope, x = model.rotary_emb(zeros), model.embed_tokens(zeros)
            dispatch.check(rope, x)  # a step with prefills
            decode = runner.decode_inputs(inp, meta)
            if decode:  # a step that only decodes
                dispatch.check(rope + decode, x)
        finally:
            set_metadata(None)
    runner.kv_cache[:, :, :, 0].zero_()
    if runner.kv_scale is not None:
        runner.kv_scale[:, :, :, 0].zero_()

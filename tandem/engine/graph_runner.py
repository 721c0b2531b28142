"""Decode steps replayed from CUDA graphs: a step of one-token rows launches one graph instead of
the ~1,200 kernels its eager forward pass launches from Python (the GPU is launch-bound there).

Graphs are captured at start for batch sizes 1, 2, 4, 8 and every 16 up to
--max-cudagraph-batch, largest first so the smaller ones reuse its memory pool, over static
buffers holding a step's inputs (token ids, positions, slot mapping, block tables, context
lengths). A step copies its inputs in and pads to the next captured size: padded rows decode
token 0 at position 0, write their K/V to the sink block (one block past the pool, owned by no
request), attend to that one slot, and are dropped. Steps with prefill tokens, or with more
rows than the largest graph, run eagerly. Everything sampling needs (logits of the sampled
rows, the sampler) runs eagerly after the replay, on the graph's output.

With `capture=False` the same buffers, padding and forward pass run without a graph: that is
how the CPU tests check everything here but the capture itself.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from tandem.distributed.step import StepInputs

if TYPE_CHECKING:
    from tandem.engine.model_runner import ModelRunner

logger = logging.getLogger("tandem.graphs")
# The context a graph of the torch backend covers: it attends through a mask over the whole
# captured width on every step (Triton's kernel stops at each row's length). Longer rows run
# eagerly.
MASKED_GRAPH_TOKENS = 8192


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16, up to and including max_batch."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class GraphRunner:
    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks: int,
                 capture: bool = True):
        """`max_blocks`: the widest block table a request can have (longer rows run eagerly)."""
        self.runner = runner
        self.sizes = capture_sizes(max_batch)
        n, dev = max_batch, runner.device
        self.sink_slot = runner.num_blocks * runner.block_size  # the first slot of the sink block

        def static(fill: int, *shape: int) -> torch.Tensor:
            return torch.full(shape or (n,), fill, dtype=torch.int64, device=dev)

        self.input_ids, self.positions, self.lens = static(0), static(0), static(1)
        self.slots, self.tables = static(self.sink_slot), static(0, n, max_blocks)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # hidden states [size, hidden] of each graph
        if capture:
            self.capture()

    def inputs(self, size: int) -> StepInputs:
        """The static buffers' first `size` rows as a step of decodes only."""
        none = self.input_ids[:0]
        return StepInputs(self.input_ids[:size], self.positions[:size], self.slots[:size],
                          self.tables[:size], self.lens[:size], none.view(0, 3), none, none, none)

    @torch.inference_mode()
    def capture(self) -> None:
        dev = self.runner.device
        torch.cuda.synchronize(dev)
        free_before, started = torch.cuda.mem_get_info(dev)[0], time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            # Run once first: lazy initialisation (cuBLAS workspaces, Triton's compilation)
            # must not happen inside the capture. Every row writes only the sink block.
            self.runner.hidden_states(self.inputs(size))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.runner.hidden_states(self.inputs(size))
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(dev)
        logger.info("captured %d decode graphs (batch sizes 1-%d) in %.1f s, %.0f MiB of GPU "
                    "memory", len(self.graphs), self.sizes[-1], time.perf_counter() - started,
                    (free_before - torch.cuda.mem_get_info(dev)[0]) / 2**20)

    def fits(self, inp: StepInputs) -> bool:
        """Whether the step only decodes, with a captured size and table width for it."""
        n = inp.input_ids.numel()
        return (0 < n <= self.sizes[-1] and inp.decode_lens.numel() == n
                and not inp.prefills.numel() and inp.decode_tables.shape[1] <= self.tables.shape[1])

    def run(self, inp: StepInputs) -> torch.Tensor:
        """The step's hidden states [rows, hidden] (a view of the graph's output buffer, valid
        until the next replay)."""
        n, width = inp.input_ids.numel(), inp.decode_tables.shape[1]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n] = inp.input_ids
        self.positions[:n] = inp.positions
        self.slots[:n] = inp.slots
        self.lens[:n] = inp.decode_lens
        self.tables[:n, :width] = inp.decode_tables
        self.tables[:n, width:] = 0
        if size > n:  # rows a bigger step left behind become padding again
            self.input_ids[n:size] = 0
            self.positions[n:size] = 0
            self.slots[n:size] = self.sink_slot
            self.lens[n:size] = 1
            self.tables[n:size] = 0
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self.outputs[size] = self.runner.hidden_states(self.inputs(size))
        return self.outputs[size][:n]

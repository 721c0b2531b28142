"""The decoder layers' compiled graphs, called without Dynamo for all but a step's first layer.

Every call of a torch.compile'd function goes through Dynamo: its cache lookup, the guards that
pick a graph, the bytecode that gathers the graph's inputs: ~1 ms of a 9 ms one-row step on a
2-core EPYC (`benchmarks/decode_step.py --dispatch-rounds`, BENCHMARKS.md). All layers run the same
graphs (compile.py), so the first layer of a step goes through Dynamo, which picks the graph for
the step's shapes, and the other layers call that graph with their own weights, as vLLM
dispatches to its compiled code without Dynamo's guards.
"""
from __future__ import annotations

import functools
import operator
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx


class DispatchMismatch(RuntimeError):
    """A layer's graph called directly gave other values than Dynamo's call of it."""


_local = threading.local()  # .call: the leader's call being traced; .ran: the graph it ran
_PLAIN = (int, float, bool, str, type(None))


def _members(module: nn.Module) -> list[tuple[str, Any]]:
    """(name, value) of a module's parameters, buffers and attributes, and of the attributes of
    objects it holds that are not modules (a quantized weight's tensors)."""
    out = [*module._parameters.items(), *module._buffers.items()]
    for key, value in vars(module).items():
        out.append((key, value))
        if hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type)):
            out += [(f"{key}.{k}", v) for k, v in vars(value).items()]
    return out


def _tensors(layer: nn.Module) -> dict[int, str]:
    """id of each tensor a layer holds -> its attribute path."""
    paths: dict[int, str] = {}
    for name, module in layer.named_modules():
        for key, value in _members(module):
            if isinstance(value, torch.Tensor):
                paths.setdefault(id(value), f"{name}.{key}" if name else key)
    return paths


def _signature(layer: nn.Module) -> tuple:
    """What Dynamo bakes into a graph besides tensors: the layer's plain attributes."""
    return tuple((name, key, value) for name, module in layer.named_modules()
                 for key, value in _members(module) if isinstance(value, _PLAIN))


def _meta(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


class Graph:
    """A compiled graph, and where each of its inputs comes from in a call `layer(step, x)`:
    ("x",), ("step", i), ("size", input, dim) or ("attr", getter, metadata Dynamo traced
    with)."""

    def __init__(self, fn: Callable, inputs: list[tuple], signature: tuple):
        self.fn, self.inputs, self.signature = fn, inputs, signature
        self.calls = [(i, s) for i, s in enumerate(inputs) if s[0] in ("x", "step")]
        self.sizes = [(i, s) for i, s in enumerate(inputs) if s[0] == "size"]
        # Per layer: its inputs with the call's own left None, or None where it differs from
        # the traced layer (which Dynamo's guards would have caught).
        self.args: weakref.WeakKeyDictionary[nn.Module, list | None] = weakref.WeakKeyDictionary()

    def __call__(self, *args):
        _local.ran = self
        return self.fn(*args)

    def args_for(self, layer: nn.Module) -> list | None:
        if layer not in self.args:
            self.args[layer] = self._static(layer)
        return self.args[layer]

    def _static(self, layer: nn.Module) -> list | None:
        if _signature(layer) != self.signature:
            return None
        args = []
        for source in self.inputs:
            value = None
            if source[0] == "attr":
                value = source[1](layer)
                if not isinstance(value, torch.Tensor) or _meta(value) != source[2]:
                    return None
            args.append(value)
        return args

    def run(self, layer: nn.Module, step: tuple[torch.Tensor, ...], x: torch.Tensor
            ) -> torch.Tensor | None:
        """The layer's output, or None when this graph cannot run it."""
        args = self.args_for(layer)
        if args is None:
            return None
        args = list(args)
        for i, source in self.calls:
            args[i] = x if source[0] == "x" else step[source[1]]
        for i, source in self.sizes:
            args[i] = args[source[1]].shape[source[2]]
        return self.fn(*args)[0]


def _layout(gm: torch.fx.GraphModule, example_inputs: list, layer: nn.Module, step: tuple,
            x: torch.Tensor) -> list[tuple] | None:
    paths = _tensors(layer)
    inputs: list[tuple] = []
    for value in example_inputs:
        if value is x:
            inputs.append(("x",))
        elif (at := next((i for i, t in enumerate(step) if value is t), None)) is not None:
            inputs.append(("step", at))
        elif isinstance(value, torch.Tensor) and id(value) in paths:
            inputs.append(("attr", operator.attrgetter(paths[id(value)]), _meta(value)))
        elif isinstance(value, torch.SymInt):
            inputs.append(("size",))  # resolved below
        else:
            return None  # an input we cannot find in another layer's call
    # A symbolic size (dynamic rows, context width) is read from the call's tensor that has
    # it: matched by symbol, not by value, which two sizes may share in the traced call.
    fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    for i, source in enumerate(inputs):
        if source[0] != "size":
            continue
        symbol = fakes[i].node.expr
        where = [(j, d) for j, (src, fake) in enumerate(zip(inputs, fakes))
                 if src[0] in ("x", "step")
                 for d, size in enumerate(fake.shape)
                 if isinstance(size, torch.SymInt) and size.node.expr == symbol]
        if not where:
            return None
        inputs[i] = ("size", *where[0])
    return inputs


def backend(options: dict) -> Callable:
    """A torch.compile backend: Inductor with `options`; a graph traced from a leader's call
    also learns where its inputs come from, so that the other layers can call it."""

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        with inductor_config.patch(options):
            fn = compile_fx(gm, example_inputs)
        call = getattr(_local, "call", None)
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        inputs = _layout(gm, example_inputs, *call) if call else None
        if inputs is None or len(outputs) != 1:
            return fn
        return Graph(fn, inputs, _signature(call[0]))

    return compile_graph


class LayerDispatch:
    """Installed on compiled layers (as their `_compiled_call_impl`): layers[0] runs through
    Dynamo and the others run the graph it ran, given the same step tuple, number of rows and
    dtype; any other call goes through Dynamo."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = list(layers)
        self.dynamo = [layer._compiled_call_impl for layer in self.layers]
        self.graph: Graph | None = None
        # What the leader's call was, which picked the graph: its step tuple (the same object
        # for every layer of one forward pass), rows and dtype.
        self.step: tuple | None = None
        self.key: tuple = ()
        self.direct = True  # False: every layer through Dynamo (benchmarks/decode_step.py)
        self.graphs: set[Graph] = set()  # every graph the leader ran
        self.layers[0]._compiled_call_impl = self.lead
        for i, layer in enumerate(self.layers[1:], 1):
            layer._compiled_call_impl = functools.partial(self.follow, i)

    @staticmethod
    def of(layers: nn.ModuleList) -> LayerDispatch | None:
        owner = getattr(layers[0]._compiled_call_impl, "__self__", None)
        return owner if isinstance(owner, LayerDispatch) else None

    def lead(self, step: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        _local.call, _local.ran = (self.layers[0], step, x), None
        try:
            out = self.dynamo[0](step, x)
        finally:
            _local.call = None
        self.graph, self.step, self.key = _local.ran, step, (x.shape[0], x.dtype)
        if self.graph is not None:
            self.graphs.add(self.graph)
        return out

    def follow(self, i: int, step: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        out = None
        if (self.direct and self.graph is not None and step is self.step
                and (x.shape[0], x.dtype) == self.key):
            out = self.graph.run(self.layers[i], step, x)
        return self.dynamo[i](step, x) if out is None else out

    def check(self, step: tuple[torch.Tensor, ...], x: torch.Tensor) -> None:
        """Run the first layer, then the second both as a step would and through Dynamo."""
        self.lead(step, x)
        if len(self.layers) > 1 and not torch.equal(self.layers[1](step, x),
                                                    self.dynamo[1](step, x)):
            raise DispatchMismatch(f"layer 1 at {x.shape[0]} rows")

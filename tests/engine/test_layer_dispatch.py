"""Compiled decoder layers called without Dynamo (engine/layer_dispatch.py), on the 2-layer
random Llama: the second layer runs the graph the first one ran, with its own weights, and
gives the tokens Dynamo on every layer gives; a layer the graph was not traced for goes through
Dynamo; a graph whose direct call gives other values turns compilation off at start-up."""
from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine import layer_dispatch
from tandem.engine.layer_dispatch import LayerDispatch

PROMPTS = [{"prompt_token_ids": [5 + i, 40, 41 + i, 60, 7 + 2 * i]} for i in range(3)]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def make(tiny_dir: str, **kw) -> LLM:
    return LLM(model=tiny_dir, **({"dtype": "float32", "kv_cache_memory": "16MiB",
                                   "max_num_seqs": 4, "max_num_batched_tokens": 16,
                                   "enforce_eager": False} | kw))


@pytest.fixture(scope="module")
def compiled(tiny_dir) -> LLM:
    torch._dynamo.reset()  # earlier tests' engines may have used up Dynamo's graphs
    return make(tiny_dir)


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def count_dynamo_calls(dispatch: LayerDispatch, monkeypatch) -> Counter:
    calls: Counter = Counter()

    def counting(i, fn):
        def call(*args):
            calls[i] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(dispatch, "dynamo",
                        [counting(i, fn) for i, fn in enumerate(dispatch.dynamo)])
    return calls


def test_later_layers_skip_dynamo_and_match_it(compiled, monkeypatch):
    assert compiled.engine.runner.compiled
    dispatch = LayerDispatch.of(compiled.engine.runner.model.model.layers)
    assert dispatch is not None
    calls = count_dynamo_calls(dispatch, monkeypatch)
    direct = tokens(compiled)
    assert calls[0] > 0 and calls[1] == 0  # chunked prefills and decodes, all direct
    assert len(dispatch.step) == 5  # the last step only decoded: attention in the graph
    monkeypatch.setattr(dispatch, "direct", False)
    assert tokens(compiled) == direct
    assert calls[1] == calls[0] / 2


def test_a_layer_unlike_the_traced_one_goes_through_dynamo(compiled, monkeypatch):
    dispatch = LayerDispatch.of(compiled.engine.runner.model.model.layers)
    monkeypatch.setattr(dispatch, "direct", False)
    reference = tokens(compiled)
    monkeypatch.setattr(dispatch, "direct", True)
    follower = compiled.engine.runner.model.model.layers[1]
    # A plain attribute the graph might have baked in (Dynamo would guard on it).
    monkeypatch.setattr(follower.mlp, "variant", 2, raising=False)
    graphs = set()
    run = layer_dispatch.Graph.run

    def recording(self, layer, step, x):
        graphs.add(self)
        return run(self, layer, step, x)

    monkeypatch.setattr(layer_dispatch.Graph, "run", recording)
    for graph in dispatch.graphs:  # their cached inputs predate the attribute
        graph.args.clear()
    calls = count_dynamo_calls(dispatch, monkeypatch)
    try:
        assert tokens(compiled) == reference
        assert graphs and all(g.args[follower] is None for g in graphs)
        assert calls[1] == calls[0] > 0
    finally:
        for graph in dispatch.graphs:
            graph.args.clear()


def test_a_graph_that_differs_from_dynamo_turns_compilation_off(tiny_dir, monkeypatch, caplog):
    monkeypatch.setattr(layer_dispatch.Graph, "run", lambda self, layer, step, x: x + 1)
    with caplog.at_level(logging.WARNING, logger="tandem.compile"):
        llm = make(tiny_dir)
    assert not llm.engine.runner.compiled
    assert "DispatchMismatch" in caplog.text
    assert all(layer._compiled_call_impl is None for layer in llm.engine.runner.model.model.layers)
    assert all(len(t) == PARAMS.max_tokens for t in tokens(llm))


def test_a_float8_cache_keeps_decode_attention_in_the_opaque_op(tiny_dir, compiled):
    llm = make(tiny_dir, kv_cache_dtype="fp8")
    dispatch = LayerDispatch.of(llm.engine.runner.model.model.layers)
    assert llm.engine.runner.compiled and dispatch is not None
    assert all(len(t) == PARAMS.max_tokens for t in tokens(llm))
    assert len(dispatch.step) == 2  # rotary only: the cache is written and read eagerly

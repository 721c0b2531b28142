"""xgrammar against llguidance on this CPU, with SmolLM2's 49k-token vocabulary: tokenizer setup,
grammar compile time (cold), and the per-token cost of filling the allowed-token bitmask,
applying it to a row of logits and advancing the matcher, walking a valid output token by token.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grammar_libs.py [--libs llguidance xgrammar]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tandem.loader.model_path import resolve_model
from tandem.loader.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "email", "tags", "address"],
}
OUTPUT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@math.com",
                     "tags": ["a", "c", "b", "a"],
                     "address": {"city": "London", "zip": "W1 2AB"}}, separators=(",", ":"))


def run_llguidance(tokenizer, vocab: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup = time.perf_counter() - t
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    t = time.perf_counter()
    m = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t
    assert not m.is_error(), m.get_error()
    mask = lt.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    steps = []
    for token in ids:
        t = time.perf_counter()
        lt.fill_next_token_bitmask(m, mask, 0)
        lt.apply_token_bitmask_inplace(logits, mask)
        assert m.consume_token(token), m.get_error()
        steps.append(time.perf_counter() - t)
    return {"setup_s": setup, "compile_s": compile_s, "steps": steps}


def run_xgrammar(tokenizer, vocab: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                          separators=(",", ":"))
    compile_s = time.perf_counter() - t
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    steps = []
    for token in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        assert m.accept_token(token)
        steps.append(time.perf_counter() - t)
    return {"setup_s": setup, "compile_s": compile_s, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--libs", nargs="+", default=["llguidance", "xgrammar"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    tokenizer = load_tokenizer(resolve_model(args.model))
    vocab = len(tokenizer)
    ids = tokenizer.encode(OUTPUT)
    torch.set_num_threads(1)
    print(f"{len(ids)} output tokens, vocabulary {vocab}, {args.runs} runs, 1 thread\n")
    print("| library | tokenizer setup (s) | schema compile (ms) | mask + apply + advance, "
          "median per token (us) | p90 (us) |\n|---|---:|---:|---:|---:|")
    for lib in args.libs:
        runs = [(run_llguidance if lib == "llguidance" else run_xgrammar)(tokenizer, vocab, ids)
                for _ in range(args.runs)]
        steps = sorted(s for r in runs for s in r["steps"][1:])  # the first walks cold caches
        print(f"| {lib} | {statistics.median(r['setup_s'] for r in runs):.2f} | "
              f"{1000 * statistics.median(r['compile_s'] for r in runs):.1f} | "
              f"{1e6 * statistics.median(steps):.0f} | {1e6 * steps[int(0.9 * len(steps))]:.0f} |")


if __name__ == "__main__":
    main()

"""Tandem's in-process decode step time: B requests of 128-token prompts decode together, and
the median of the last steps (all B decoding, prefill long done) is reported per batch size.
No server, no client: the engine's own step, which BENCHMARKS.md's CPU decode numbers quote.

    .venv/bin/python benchmarks/decode_step.py --batches 1 16 64 --decode-weight-dtype float16
    .venv/bin/python benchmarks/decode_step.py --quantization gguf --decode-weight-dtype auto
    .venv/bin/python benchmarks/decode_step.py --quantization gguf --batches 1 --profile
    .venv/bin/python benchmarks/decode_step.py --quantization gguf --other-thread
    .venv/bin/python benchmarks/decode_step.py --quantization gguf --bmm-min-decodes 1000000
    .venv/bin/python benchmarks/decode_step.py --quantization gguf --dispatch-rounds 5
"""
from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
from collections.abc import Callable

import torch

from tandem import LLM, SamplingParams
from tandem.attention import torch_ref
from tandem.config import DECODE_WEIGHT_DTYPES, QUANTIZATIONS
from tandem.engine.layer_dispatch import LayerDispatch


def step_ms(llm: LLM, batch: int, steps: int, tag: str, profile: bool = False) -> float:
    """Median decode step; with `profile`, also print where the decode steps spent their time
    (the profiler's own overhead inflates the median)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):  # distinct prompts: no prefix-cache hits between requests
        engine.add_request(f"{tag}-{i}", list(range(100 + i, 228 + i)), params)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    times = []
    while engine.has_unfinished_requests():
        if profile and len(times) == 4:  # past the prefill
            prof.start()
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    if profile:
        prof.stop()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                        max_name_column_width=50))
    return statistics.median(times[-steps:]) * 1e3


def on_another_thread(fn: Callable[[], float]) -> float:
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def prefill_tok_s(llm: LLM, prompts: int = 8, length: int = 512, rounds: int = 3) -> float:
    """Prompt tokens a second, prefilling `prompts` distinct prompts (max_tokens 1)."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for r in range(rounds):
        batch = [{"prompt_token_ids": [(7 * j + 13 * i + r) % 40000 + 100 for j in range(length)]}
                 for i in range(prompts)]
        t0 = time.perf_counter()
        llm.generate(batch, params)
        times.append(time.perf_counter() - t0)
    return prompts * length / statistics.median(times)


def compare_dispatch(llm: LLM, args: argparse.Namespace) -> None:
    """Step medians with the layers' graphs called directly and with Dynamo on every layer,
    in alternating rounds of one process (a shared machine drifts between processes)."""
    dispatch = LayerDispatch.of(llm.engine.runner.model.model.layers)
    if dispatch is None:
        raise SystemExit("--dispatch-rounds needs compiled layers")
    print("\n| batch | direct (ms) | Dynamo every layer (ms) | ratio |\n|---:|---:|---:|---:|")
    for b in args.batches:
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.dispatch_rounds):
            for direct in (True, False):
                dispatch.direct = direct
                times[direct].append(step_ms(llm, b, args.steps, f"b{b}-{r}-{direct}"))
        fast, slow = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {b} | {fast:.2f} | {slow:.2f} | {fast / slow:.3f} |", flush=True)
    dispatch.direct = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--decode-weight-dtype", default="float16", choices=list(DECODE_WEIGHT_DTYPES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    p.add_argument("--dense-weight-copy", action="store_true")
    p.add_argument("--prefill", action="store_true", help="also time a prefill of 8 x 512 tokens")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile")
    p.add_argument("--profile", action="store_true", help="print each batch's top ops")
    p.add_argument("--steps", type=int, default=10, help="decode steps in each median")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--other-thread", action="store_true",
                   help="step on a second thread, not the one that loaded the model (what "
                        "AsyncEngine did before it built the engine on its own thread)")
    p.add_argument("--dispatch-rounds", type=int, default=0,
                   help="rounds alternating the compiled layers' direct dispatch with Dynamo "
                        "on every layer (engine/layer_dispatch.py), medians of each")
    p.add_argument("--bmm-min-decodes", type=int, default=torch_ref.BMM_MIN_DECODES,
                   help="decodes from which CPU attention uses batched matmuls, not SDPA")
    args = p.parse_args()
    torch_ref.BMM_MIN_DECODES = args.bmm_min_decodes
    torch.set_num_threads(args.threads)
    llm = LLM("smollm2", dtype=args.dtype, decode_weight_dtype=args.decode_weight_dtype,
              quantization=args.quantization, dense_weight_copy=args.dense_weight_copy,
              enforce_eager=args.enforce_eager)
    print(f"dtype {args.dtype}, decode weights {args.decode_weight_dtype}, quantization "
          f"{args.quantization}, dense copy {args.dense_weight_copy}, "
          f"{'eager' if args.enforce_eager else 'compiled'}, {args.threads} threads, stepped on "
          f"{'another' if args.other_thread else 'the loading'} thread, batched-matmul "
          f"attention from {args.bmm_min_decodes} decodes\n\n| batch | step ms | tok/s |\n"
          f"|---:|---:|---:|")
    if args.dispatch_rounds:
        compare_dispatch(llm, args)
        return
    for b in args.batches:
        run = functools.partial(step_ms, llm, b, args.steps, f"b{b}", args.profile)
        ms = on_another_thread(run) if args.other_thread else run()
        print(f"| {b} | {ms:.1f} | {b / ms * 1e3:.1f} |", flush=True)
    if args.prefill:
        print(f"\nprefill of 8 x 512-token prompts: {prefill_tok_s(llm):.0f} tok/s")


if __name__ == "__main__":
    main()

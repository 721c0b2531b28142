"""What verifying k proposed tokens costs one request's step, in-process: the median engine
step with k forced proposals (k = 0: a plain decode), on `tandem serve`'s default model.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/spec_step.py --k 0 1 2 4
"""
from __future__ import annotations

import argparse
import statistics
import time

from tandem import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    llm = LLM(model=args.model, speculative_config={"method": "ngram",
                                                    "num_speculative_tokens": max(args.k) or 1})
    engine = llm.engine
    engine.config.speculative_config = None  # proposals are forced below, not looked up
    engine.add_request("r", list(range(1000, 1100)),
                       SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True))
    for _ in range(5):
        engine.step()
    req = engine.scheduler.running[0]

    def median_ms(k: int, n: int) -> float:
        times = []
        for _ in range(n):
            req.spec_token_ids = [5] * k  # rejected at once: every step verifies k tokens
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    print("| proposed tokens | step (ms) |\n|---:|---:|")
    for k in args.k:
        median_ms(k, 5)  # warm: each row count compiles once
        print(f"| {k} | {median_ms(k, args.steps):.2f} |")
    llm.shutdown()


if __name__ == "__main__":
    main()

"""Speculation off against n-gram in one engine, in-process, alternating many short rounds:
on a shared, noisy machine a pair of rounds sees the same weather, so the median of the pairs'
ratios is steadier than separate servers' runs (benchmarks/spec_decode.py). Same prompts
(spec_decode.py's workloads), greedy, ignore_eos.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/spec_inprocess.py \
        --workload open --concurrency 1 --rounds 10
"""
from __future__ import annotations

import argparse
import statistics
import time

from tandem import LLM, SamplingParams

from spec_decode import prompts  # isort: skip  (the script's folder is on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--workload", choices=["grounded", "open"], default="open")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--k", type=int, default=4)
    args = p.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4}
    llm = LLM(model=args.model, speculative_config=spec, max_model_len=2048)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    texts = prompts(engine.tokenizer, args.workload, 2 * args.concurrency)
    spec = engine.config.speculative_config  # as the engine normalized it

    def tok_s(on: bool) -> float:
        engine.config.speculative_config = spec if on else None  # the same engine either way
        start = time.perf_counter()
        for i in range(0, len(texts), args.concurrency):
            llm.generate(texts[i:i + args.concurrency], params)
        return len(texts) * args.output_len / (time.perf_counter() - start)

    tok_s(False), tok_s(True)  # warm: every step shape compiles here
    s = engine.scheduler
    drafted, accepted = s.spec_draft_tokens, s.spec_accepted_tokens
    ratios, off, on = [], [], []
    for i in range(args.rounds):
        pair = {}
        for mode in ((False, True) if i % 2 == 0 else (True, False)):
            pair[mode] = tok_s(mode)
        off.append(pair[False])
        on.append(pair[True])
        ratios.append(pair[True] / pair[False])
    drafted, accepted = s.spec_draft_tokens - drafted, s.spec_accepted_tokens - accepted
    print(f"{args.workload} C={args.concurrency}: off {statistics.median(off):.1f} tok/s, n-gram "
          f"{statistics.median(on):.1f}; speed-up median {statistics.median(ratios):.2f}x "
          f"(pairs {min(ratios):.2f}-{max(ratios):.2f}, {args.rounds} rounds); "
          f"{accepted}/{drafted} proposed tokens accepted")
    llm.shutdown()


if __name__ == "__main__":
    main()

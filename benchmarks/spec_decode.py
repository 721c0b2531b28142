"""Speculative decoding through `tandem serve`: output tok/s, time per output token and
acceptance, speculation off against n-gram proposals and a draft model, on two workloads:

  grounded   chat prompts that ask to repeat a given code block with one name changed: the
             output repeats the input, which is where n-gram proposals pay
  open       open-ended chat questions: the output rarely repeats the prompt

Each configuration gets a fresh server (greedy, ignore_eos, --output-len tokens), the
workloads run at each --concurrency, and --runs rounds rotate the order of the --modes.
--server-args go to every server (e.g. "--quantization none" for a dense target, which the
4-bit file itself can then draft for: --draft-model smollm2).

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/spec_decode.py
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics

from tandem.loader.model_path import resolve_model
from tandem.loader.tokenizer import load_tokenizer
from tandem.procs import answers_ready

# The script's own folder is on sys.path when it runs as a file.
from kv_store import counters  # isort: skip
from offline_throughput import machine  # isort: skip
from router_cache import Request, Workload, drive  # isort: skip
from router_peers import exit_on_sigterm, process, tandem_replica  # isort: skip

CODE = [
    ("total", ("def {name}(values):\n    result = 0\n    for value in values:\n"
     "        result += value\n    return result\n\n\nprint({name}([1, 2, 3]))\n")),
    ("mean", ("def {name}(xs):\n    if not xs:\n        raise ValueError('empty')\n"
     "    return sum(xs) / len(xs)\n\n\nfor row in [[1, 2], [3, 4, 5]]:\n"
     "    print({name}(row))\n")),
    ("load", ("import json\n\n\ndef {name}(path):\n    with open(path) as f:\n"
     "        data = json.load(f)\n    return data['items']\n\n\nitems = {name}('a.json')\n")),
    ("clamp", ("def {name}(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n"
     "        return hi\n    return x\n\n\nprint({name}(5, 0, 3))\n")),
]
QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three good habits for staying healthy, and why?",
    "Explain how a bicycle stays upright while it moves.",
    "Describe your ideal weekend in a few sentences.",
]
OFF, NGRAM, DRAFT = "off", "ngram", "draft"


def prompts(tokenizer, kind: str, n: int) -> list[str]:
    out = []
    for i in range(n):
        if kind == "grounded":
            name, code = CODE[i % len(CODE)]
            text = (f"Rename the function `{name}` to `{name}_v2` in this code and print the "
                    f"whole code again, changed:\n\n```python\n{code.format(name=name)}```")
        else:
            text = QUESTIONS[i % len(QUESTIONS)]
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True))
    return out


def spec_counters(url: str) -> tuple[float, float]:
    """Proposed and accepted tokens so far, from /metrics."""
    c = counters(url)
    return (c.get("spec_decode_num_draft_tokens_total", 0.0),
            c.get("spec_decode_num_accepted_tokens_total", 0.0))


def measure(args: argparse.Namespace, tokenizer, mode: str) -> dict[str, dict]:
    extra = ["--max-model-len", "2048", *args.server_args.split()]
    if mode == NGRAM:
        extra += ["--speculative-config", json.dumps(
            {"method": "ngram", "num_speculative_tokens": args.k,
             "prompt_lookup_max": args.lookup_max})]
    elif mode == DRAFT:
        extra += ["--speculative-config", json.dumps(
            {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": args.k})]
    cmd, url = tandem_replica(args.model, *extra)
    out = {}
    with process(cmd, url, answers_ready):
        w = Workload(output_len=args.output_len)
        # Every kind of step the run will take (chunks of each proposal length, batches of each
        # C), so compilation happens here and not in the timed runs.
        for c in args.concurrency:
            warm = [Request(0, p, [], 0.0) for kind in ("grounded", "open")
                    for p in prompts(tokenizer, kind, c)]
            asyncio.run(drive(url, warm, Workload(output_len=32), args.model, c))
        for kind in ("grounded", "open"):
            for c in args.concurrency:
                reqs = [Request(0, p, [], 0.0) for p in prompts(tokenizer, kind, c * args.per_c)]
                before = spec_counters(url)
                wall, results = asyncio.run(drive(url, reqs, w, args.model, c))
                after = spec_counters(url)
                ok = [r for r in results if not r.error]
                tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                        if r.output_tokens > 1]
                drafts, accepted = after[0] - before[0], after[1] - before[1]
                out[f"{kind}-c{c}"] = {
                    "output_tok_s": sum(r.output_tokens for r in ok) / wall,
                    "tpot_ms": 1000 * statistics.median(tpot),
                    "errors": len(results) - len(ok), "draft_tokens": drafts,
                    "accepted_tokens": accepted,
                    "acceptance": accepted / drafts if drafts else 0.0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--per-c", type=int, default=2, help="requests per unit of concurrency")
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=[OFF, NGRAM], choices=[OFF, NGRAM, DRAFT])
    p.add_argument("--draft-model", default="smollm2", help="the draft for --modes draft")
    p.add_argument("--server-args", default="", help="more `tandem serve` flags, for every mode")
    p.add_argument("--json", help="write every raw number here")
    args = p.parse_args()
    if args.modes[0] != OFF:
        p.error("--modes: off first (speed-ups are against it)")
    exit_on_sigterm()
    tokenizer = load_tokenizer(resolve_model(args.model))
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for i in range(args.runs):
        shift = i % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            print(f"run {i + 1}/{args.runs}: {mode} ...", flush=True)
            runs[mode].append(measure(args, tokenizer, mode))
    info = machine()
    on = args.modes[1:]
    lines = [(f"Machine: {info['cpu']}; flags: {info['flags']}; {info['cores']} cores. Model "
              f"{args.model} {args.server_args}, greedy, {args.output_len} tokens out "
              f"(ignore_eos), {args.per_c} x C requests per workload; k={args.k}, n-gram "
              f"prompt_lookup_max={args.lookup_max}, draft {args.draft_model}; medians of "
              f"{args.runs} run(s)."), "",
             "| workload | C | off tok/s | " + " | ".join(
                 f"{m} tok/s | speed-up | {m} TPOT (ms) | acceptance" for m in on)
             + " | off TPOT (ms) |",
             "|---|---:|---:|" + "---:|---:|---:|---:|" * len(on) + "---:|"]

    def med(mode: str, key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in runs[mode])

    for key in runs[OFF][0]:
        kind, c = key.rsplit("-c", 1)
        cells = [kind, c, f"{med(OFF, key, 'output_tok_s'):.1f}"]
        for mode in on:
            # Pairs from the same round: each ratio has the same machine weather.
            speedup = statistics.median(b[key]["output_tok_s"] / a[key]["output_tok_s"]
                                        for a, b in zip(runs[OFF], runs[mode]))
            cells += [f"{med(mode, key, 'output_tok_s'):.1f}", f"{speedup:.2f}x",
                      f"{med(mode, key, 'tpot_ms'):.1f}",
                      f"{100 * med(mode, key, 'acceptance'):.0f}%"]
        cells.append(f"{med(OFF, key, 'tpot_ms'):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()

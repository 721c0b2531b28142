"""Tandem on an NVIDIA GPU, in one go (under 5 minutes on an H100/H200): correctness, then speed.

Correctness (float32 unless said; random weights of the first shape, or --model):
1. greedy tokens of 8 prompts of 1-200 tokens in one batch equal HF transformers' per-prompt
   `generate` (also with preemption and with every prefill chunked);
2. greedy tokens of 10 prompts of 1-200 tokens (decode steps padded from 10 to a captured 16)
   identical with CUDA graphs on and off and with either attention backend: graphs + triton,
   eager + triton and graphs + torch, each against eager + torch;
3. bfloat16 prefill logits close to HF's (Tandem's distance from float32 at most twice HF
   bfloat16's own + 0.05; top-1 as float32 at most 5 points below HF's);
4. shown, not gated: fp8 KV cache greedy tokens with graphs on vs off; int4 weights
   (`quantization="int4"`) against bfloat16: decode tok/s at batch 1 and teacher-forced top-1
   agreement (int4 gates only on running).
Speed, bfloat16, per shape (SmolLM2-135M's and Llama-3.2-1B's, random weights): decode tok/s at
each batch for Tandem eager (enforce_eager=True), Tandem with CUDA graphs (the default) and HF
(plus HF with a static cache, which HF compiles on CUDA, at the --hf-compile batches), against
the HBM floor: bfloat16 weights + the KV cache read per step, over a device copy's bandwidth.
Ends with a table per shape, the issue's targets (met/missed: not an exit status) and PASS/FAIL
for correctness (exit 1 when a gate fails).

Random weights: the real ones are over the GPU machine's transfer limit, and speed does not
depend on their values. The 1B model is initialised on the GPU and saved in bfloat16 (2.5 GB).
The GPU machine's image has torch, triton, transformers,
safetensors and tokenizers; tandem comes from the repository (PYTHONPATH=.), and two of its
imports are not in the image: carry their wheels (llguidance, gguf: `pip download --no-deps
--only-binary=:all: --python-version 3.12 ... -d .whl`, see the device README) and a tokenizer
folder, e.g. SmolLM2's converted one's tokenizer*/chat_template files in .bench/tok (3.5 MB):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    HF_HUB_OFFLINE=1 PYTHONPATH=.:/tmp/site python3 benchmarks/gpu_check.py \
        --tokenizer-from .bench/tok

A CPU smoke run (no graphs there; the triton variants need TRITON_INTERPRET=1, else skipped):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_check.py --device cpu --shapes tiny \
        --batches 1 2 --new 4 --greedy-tokens 4 --prompt-len 16 --tokenizer-from TOKDIR
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch
import transformers
from cuda_check import check_greedy, free
from kv_accuracy import Scorer
from offline_throughput import hf_weight_bytes
from random_model import SHAPES, write_random_model

from tandem import LLM, SamplingParams

# Today's figures (BENCHMARKS.md, "GPU check (issue 7)", H200, SmolLM2 shape, eager) and the
# issue's targets against them.
TODAY_B1 = (35.1, 43.3)  # tok/s, batch 1
TODAY_B256 = (6102.8, 10826.1)  # tok/s, batch 256
TARGET_SMOLLM2_B1 = 400.0  # tok/s, one-row decode, SmolLM2 shape
TARGET_1B_FLOOR = 0.5  # one-row decode on the 1B shape: this fraction of the HBM floor
TARGET_B256_GAIN = 2.0  # batch 256 against the higher of today's figures
MIXED_LENS = (1, 3, 9, 17, 33, 64, 100, 128, 150, 200)  # 10 rows: graph steps pad to 16


@dataclass
class Gate:
    """One correctness result; `gated=False` is shown but does not fail the run."""
    name: str
    ok: bool
    detail: str
    gated: bool = True


@dataclass
class ShapeResult:
    """Decode tok/s by batch for each engine, and what the floor needs."""
    shape: str
    weight_bytes: int
    kv_bytes_per_token: int
    speeds: dict[str, dict[int, float]] = field(default_factory=dict)
    graph_log: str = ""


class GraphLog(logging.Handler):
    """Keeps the last 'tandem.graphs' INFO line (capture time, graph memory) for the report."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n, length), generator=g).tolist()


def mixed_prompts(seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (n,), generator=g).tolist() for n in MIXED_LENS]


def triton_usable(dev: torch.device) -> bool:
    """Triton's kernels run on CUDA, and on the CPU only in its (slow) interpreter."""
    return dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def kv_memory(dev: torch.device) -> str:
    """KV cache for the correctness checks: plenty on a GPU; on the CPU, where the pool is
    zeroed at start (1 GiB: ~0.5 s), enough for SmolLM2's shape in float32 (~110 MB)."""
    return "1GiB" if dev.type == "cuda" else "256MiB"


def graphs_kw(dev: torch.device, graphs: bool) -> dict:
    """Engine keywords for graphs on/off. Off CUDA there are no graphs: 'on' is then the
    default engine (torch.compile of the decoder layers on the CPU, unless
    TANDEM_ENFORCE_EAGER=1, as the test suite sets, makes it eager)."""
    if not graphs:
        return {"enforce_eager": True}
    return {"enforce_eager": False} if dev.type == "cuda" else {}


def run_section(gates: list[Gate], name: str, fn, *args) -> None:
    """Run one check; an exception becomes a failed gate, so one broken feature does not cost
    the rest of a device session's run."""
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on
        traceback.print_exc()
        result = [Gate(name, False, f"raised {type(e).__name__}: {e}")]
    for g in result if isinstance(result, list) else [result]:
        gates.append(g)
        print(f"[{g.name}] {'ok' if g.ok else 'FAILED' if g.gated else 'differs'}: "
              f"{g.detail}", flush=True)
    print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


# ---------------------------------------------------------------- correctness


def check_hf_greedy(model: str, dev: torch.device, new: int) -> Gate:
    failures = check_greedy(model, "float32", str(dev), new=new)
    return Gate("float32 greedy vs HF (default, preempt, chunked)", not failures,
                "identical" if not failures else f"{failures} variants differ")


def greedy(model: str, dev: torch.device, ids: list[list[int]], new: int, **kw) -> list:
    """Greedy tokens of `ids`, all in one batch, on a fresh engine made with `kw`."""
    llm = LLM(model=model, device=str(dev), kv_cache_memory=kv_memory(dev), **kw)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    out = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in ids], params)]
    del llm
    free(dev)
    return out


def agreement(got: list[list[int]], ref: list[list[int]]) -> tuple[bool, str]:
    rows = sum(a == b for a, b in zip(got, ref))
    toks = sum(x == y for a, b in zip(got, ref) for x, y in zip(a, b))
    return rows == len(ref), (f"{rows}/{len(ref)} prompts identical, "
                              f"{toks}/{sum(map(len, ref))} tokens")


def check_graphs_backends(model: str, dev: torch.device, new: int) -> list[Gate]:
    """float32 greedy tokens, CUDA graphs on/off x triton/torch attention, against eager +
    torch. Graphs up to 16 rows, so the 10-row decode steps replay a padded graph."""
    ids = mixed_prompts()
    common = {"dtype": "float32", "max_cudagraph_batch": 16}
    ref = greedy(model, dev, ids, new, enforce_eager=True, attention_backend="torch", **common)
    gates = []
    for graphs in (True, False):
        for backend in ("triton", "torch"):
            name = f"{'graphs' if graphs else 'eager'} + {backend} vs eager + torch"
            if (graphs, backend) == (False, "torch"):
                continue
            if backend == "triton" and not triton_usable(dev):
                gates.append(Gate(name, True, "skipped: triton off CUDA needs "
                                  "TRITON_INTERPRET=1", gated=False))
                continue
            if graphs and dev.type != "cuda":
                name += " (no graphs off CUDA: the default engine)"
            got = greedy(model, dev, ids, new, attention_backend=backend,
                         **graphs_kw(dev, graphs), **common)
            gates.append(Gate(name, *agreement(got, ref)))
    return gates


def check_fp8_graphs(model: str, dev: torch.device, new: int) -> Gate:
    """fp8 KV cache: graphs on vs off, shown only. fp8 rounds K/V, and any difference in a
    GEMM's rounding before the cast can flip a greedy choice on random weights
    (cuda_check._fp8_teacher_forced says why free-running tokens are no gate)."""
    ids = mixed_prompts()
    kw = {"dtype": "float32", "kv_cache_dtype": "fp8", "max_cudagraph_batch": 16}
    on = greedy(model, dev, ids, new, **graphs_kw(dev, True), **kw)
    off = greedy(model, dev, ids, new, **graphs_kw(dev, False), **kw)
    return Gate("fp8 KV cache: graphs on vs off", *agreement(on, off), gated=False)


def check_int4(model: str, dev: torch.device, new: int, prompt_len: int) -> Gate:
    """int4 weights against bfloat16: batch-1 decode tok/s and, fed bfloat16's greedy tokens,
    how often int4's argmax is the same token. Random weights give near-flat next-token
    distributions, so agreement is low there even for a correct int4 path: shown, and gated
    only on running."""
    ps = prompts(4, 32, seed=3)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    rates, logits, mem = {}, {}, {}
    ref = None
    for name, kw in (("bfloat16", {}), ("int4", {"quantization": "int4"})):
        llm = LLM(model=model, dtype="bfloat16", device=str(dev), kv_cache_memory=kv_memory(dev),
                  max_num_seqs=8, max_cudagraph_batch=8, enable_prefix_caching=False, **kw)
        mem[name] = llm.engine.runner.weight_bytes
        rates[name] = decode_rate(llm, dev, 1, prompt_len, new)
        if ref is None:
            ref = [o.outputs[0].token_ids for o in llm.generate(
                [{"prompt_token_ids": p} for p in ps], params)]
        scorer = Scorer(llm)
        logits[name] = torch.cat([scorer.logits(p + r[:-1])[len(p) - 1:].argmax(-1).cpu()
                                  for p, r in zip(ps, ref)])
        del llm, scorer
        free(dev)
    agree = (logits["int4"] == logits["bfloat16"]).float().mean().item()
    return Gate("int4 weights vs bfloat16", True,
                f"batch-1 decode int4 {rates['int4']:.1f} tok/s, bfloat16 "
                f"{rates['bfloat16']:.1f} tok/s; weights {mem['int4'] / 1e6:.0f} MB vs "
                f"{mem['bfloat16'] / 1e6:.0f} MB; teacher-forced top-1 agreement "
                f"{100 * agree:.1f}% over {len(logits['int4'])} positions")


def check_bf16_logits(model: str, dev: torch.device) -> Gate:
    """Tandem bfloat16 against HF bfloat16, both measured from HF float32 at every position
    of 4 prompts (384 next-token predictions): Tandem may be at most twice as far as HF
    (+0.05), and must pick float32's top-1 token at most 5 points less often than HF does.
    Rates over many positions, because bfloat16 flips near-ties, in HF as in Tandem."""
    ps = prompts(4, 96, seed=1)
    ref, hf16 = [], []
    for dtype, out in ((torch.float32, ref), (torch.bfloat16, hf16)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(dev).eval()
        with torch.inference_mode():
            out += [hf(torch.tensor([p], device=dev)).logits[0].float().cpu() for p in ps]
        del hf
        free(dev)
    llm = LLM(model=model, dtype="bfloat16", device=str(dev), kv_cache_memory=kv_memory(dev),
              max_cudagraph_batch=8)  # prefills only: a few graphs are enough
    scorer = Scorer(llm)
    ours = [scorer.logits(p).cpu() for p in ps]
    del llm, scorer
    free(dev)
    ref, hf16, ours = torch.cat(ref), torch.cat(hf16), torch.cat(ours)
    d_hf, d_ours = (hf16 - ref).abs().max().item(), (ours - ref).abs().max().item()
    top1_hf = (hf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    top1_ours = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ok = d_ours <= 2 * d_hf + 0.05 and top1_ours >= top1_hf - 0.05
    return Gate("bfloat16 logits close to HF", ok,
                f"max |logit - float32|: Tandem {d_ours:.3f}, HF {d_hf:.3f}; top-1 as "
                f"float32 over {len(ref)} positions: Tandem {100 * top1_ours:.1f}%, "
                f"HF {100 * top1_hf:.1f}%")


# ---------------------------------------------------------------- speed


def kv_bytes_per_token(model: str, itemsize: int = 2) -> int:
    """K and V of every layer for one token: what a decode step reads per context token."""
    c = transformers.AutoConfig.from_pretrained(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * itemsize


def decode_rate(llm: LLM, dev: torch.device, batch: int, prompt_len: int, new: int,
                tag: str = "") -> float:
    """Decode tokens/s: the median step while all `batch` requests decode together (steps
    that still prefill some request are left out)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i, ids in enumerate(prompts(batch, prompt_len, seed=2)):
        engine.add_request(f"{tag}b{batch}-{i}", ids, params)
    started, steps = set(), []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        sync(dev)
        dt = time.perf_counter() - t0
        if len(started) == batch and len(outs) == batch:
            steps.append(dt)
        started |= {o.request_id for o in outs}
    return batch / statistics.median(steps)


def tandem_speeds(model: str, dev: torch.device, batches: list[int], prompt_len: int,
                  new: int, eager: bool, graph_log: GraphLog) -> tuple[dict[int, float], str]:
    """One engine (KV cache sized for the largest batch) runs every batch in turn, after a
    short warm-up at the largest (first calls: cuBLAS handles, Triton's JIT, allocator)."""
    need = max(batches) * (prompt_len + new + 32) * kv_bytes_per_token(model)
    graph_log.last = ""
    llm = LLM(model=model, dtype="bfloat16", device=str(dev), **graphs_kw(dev, not eager),
              max_num_seqs=max(batches), enable_prefix_caching=False,
              kv_cache_memory=int(need * 1.25) + (64 << 20))
    log = graph_log.last
    decode_rate(llm, dev, max(batches), prompt_len, 3, tag="warm-up-")
    rates = {b: decode_rate(llm, dev, b, prompt_len, new) for b in batches}
    del llm
    free(dev)
    return rates, log


def hf_speeds(model: str, dev: torch.device, batches: list[int], prompt_len: int, new: int,
              static: bool = False) -> dict[int, float]:
    """Decode tokens/s: (time for 1 + new tokens) - (time for 1 token), static batch.
    static: a static KV cache, for which HF's `generate` compiles the decode step on CUDA
    (torch.compile, mode reduce-overhead); warmed up at the measured length, because the
    cache's size, and so the compiled graph, depends on it."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    hf = hf.to(dev).eval()
    extra = {"cache_implementation": "static"} if static else {}

    def timed(ids: torch.Tensor, n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **extra)
        sync(dev)
        return time.perf_counter() - t0

    rates = {}
    for batch in batches:
        ids = torch.tensor(prompts(batch, prompt_len, seed=2), device=dev)
        timed(ids, 1 + new if static else 2)  # warm-up
        rates[batch] = batch * new / (timed(ids, 1 + new) - timed(ids, 1))
        print(f"  HF{' static' if static else ''} batch {batch}: {rates[batch]:.1f} tok/s",
              flush=True)
    hf = None  # dropped before free() so the GPU memory goes back
    free(dev)
    return rates


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (CPU: 256 MiB)."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 26)
    a, b = torch.ones(n, device=dev), torch.empty(n, device=dev)
    times = []
    for _ in range(6):
        sync(dev)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / statistics.median(times[1:])


def floor_ms(res: ShapeResult, batch: int, context: int, bandwidth: float) -> float:
    """The least time a decode step can take: its bytes read from HBM (every bfloat16 weight
    once, the tied embedding / LM head once, plus each row's K/V up to `context`) at the
    copy bandwidth. Activations and writes are left out: a floor, not an estimate."""
    return (res.weight_bytes + batch * context * res.kv_bytes_per_token) / bandwidth * 1e3


def measure_shape(shape: str, model: str, dev: torch.device, args, graph_log: GraphLog,
                  gates: list[Gate]) -> ShapeResult:
    """Each engine's rates at every batch; an engine that raises leaves its column empty and
    fails a gate, and the others still run."""
    res = ShapeResult(shape, hf_weight_bytes(model, torch.bfloat16), kv_bytes_per_token(model))
    runs = {"eager": lambda: tandem_speeds(model, dev, args.batches, args.prompt_len, args.new,
                                           True, graph_log)[0]}

    def graphs() -> dict[int, float]:
        rates, res.graph_log = tandem_speeds(model, dev, args.batches, args.prompt_len,
                                             args.new, False, graph_log)
        return rates

    runs["graphs"] = graphs
    if not args.skip_hf:
        runs["HF"] = lambda: hf_speeds(model, dev, args.batches, args.prompt_len, args.new)
        if args.hf_compile:
            runs["HF static+compile"] = lambda: hf_speeds(model, dev, args.hf_compile,
                                                          args.prompt_len, args.new, static=True)
    for name, run in runs.items():
        t0 = time.perf_counter()
        try:
            res.speeds[name] = run()
        except Exception as e:  # noqa: BLE001 - reported, and the run goes on
            traceback.print_exc()
            res.speeds[name] = {}
            gates.append(Gate(f"speed run, {shape}, {name}", False,
                              f"raised {type(e).__name__}: {e}"))
        print(f"  {name}: " + ", ".join(f"b{b} {r:.1f}" for b, r in res.speeds[name].items())
              + f" tok/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    return res


# ---------------------------------------------------------------- report


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def shape_table(res: ShapeResult, args, bandwidth: float) -> list[str]:
    """batch | floor ms | each engine's tok/s | graphs/eager | each engine's % of the floor."""
    context = args.prompt_len + args.new // 2  # the median decode step's context
    engines = list(res.speeds)
    lines = [f"### {res.shape}: bfloat16 weights {res.weight_bytes / 1e6:.0f} MB, KV "
             f"{res.kv_bytes_per_token / 1e3:.1f} kB a token; {args.prompt_len}-token prompts, "
             f"{args.new} new" + (f"; {res.graph_log}" if res.graph_log else ""), "",
             "| batch | floor ms | " + " | ".join(f"{e} tok/s" for e in engines)
             + " | graphs/eager | " + " | ".join(f"{e} % floor" for e in engines) + " |",
             "|---:" * (3 + 2 * len(engines)) + "|"]
    for b in args.batches:
        f_ms = floor_ms(res, b, context, bandwidth)
        rates = [res.speeds[e].get(b) for e in engines]
        pct = [None if r is None else 100 * f_ms / (b / r * 1e3) for r in rates]
        eager, graphs = res.speeds["eager"].get(b), res.speeds["graphs"].get(b)
        ratio = None if eager is None or graphs is None else graphs / eager
        lines.append(f"| {b} | {f_ms:.3f} | " + " | ".join(fmt(r) for r in rates)
                     + f" | {fmt(ratio, '.2f')}x | " + " | ".join(fmt(p) for p in pct) + " |")
    return lines


def target_lines(results: dict[str, ShapeResult], args, bandwidth: float) -> list[str]:
    """The issue's speed targets, each met or missed (or not measured in this run)."""
    context = args.prompt_len + args.new // 2

    def graphs(shape: str, batch: int) -> float | None:
        return results[shape].speeds["graphs"].get(batch) if shape in results else None

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else "target met" if ok else "target missed"

    lines = []
    b1 = graphs("smollm2", 1)
    lines.append(f"- SmolLM2 shape, batch 1, graphs: {fmt(b1)} tok/s (today eager "
                 f"{TODAY_B1[0]}-{TODAY_B1[1]}; target >= {TARGET_SMOLLM2_B1:.0f}): "
                 f"{verdict(None if b1 is None else b1 >= TARGET_SMOLLM2_B1)}")
    one = graphs("llama-3.2-1b", 1)
    frac = (None if one is None else
            floor_ms(results["llama-3.2-1b"], 1, context, bandwidth) / (1e3 / one))
    lines.append(f"- Llama-3.2-1B shape, batch 1, graphs: {fmt(one)} tok/s = "
                 f"{fmt(None if frac is None else 100 * frac)}% of the HBM floor (target >= "
                 f"{100 * TARGET_1B_FLOOR:.0f}%): "
                 f"{verdict(None if frac is None else frac >= TARGET_1B_FLOOR)}")
    b256, best = graphs("smollm2", 256), max(TODAY_B256)
    lines.append(f"- SmolLM2 shape, batch 256, graphs: {fmt(b256)} tok/s = "
                 f"{fmt(None if b256 is None else b256 / best, '.2f')}x today's best eager "
                 f"{best:.0f} (today {TODAY_B256[0]:.0f}-{TODAY_B256[1]:.0f}; target >= "
                 f"{TARGET_B256_GAIN:.0f}x): "
                 f"{verdict(None if b256 is None else b256 >= TARGET_B256_GAIN * best)}")
    return lines


def report(name: str, gates: list[Gate], results: dict[str, ShapeResult], args,
           bandwidth: float, seconds: float) -> bool:
    failed = [g for g in gates if g.gated and not g.ok]
    print(f"\n## gpu_check on {name} ({seconds:.0f} s)\n")
    print(f"Copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); floor = (bfloat16 weights "
          f"+ batch x {args.prompt_len + args.new // 2} context tokens of K/V) / bandwidth.\n")
    for res in results.values():
        print("\n".join(shape_table(res, args, bandwidth)) + "\n")
    print("Correctness:\n" + ("" if gates else "\n- skipped (--skip-checks)"))
    for g in gates:
        state = ("PASS" if g.ok else "FAIL") if g.gated else "shown"
        print(f"- {state}: {g.name}: {g.detail}")
    print("\nTargets (not gated):\n")
    print("\n".join(target_lines(results, args, bandwidth)))
    print(f"\nTime: {seconds:.0f} s in all (budget 300 s on an H100/H200)")
    print("\nGPU CHECK", "PASSED" if not failed else f"FAILED ({len(failed)} gates)")
    return not failed


def build_models(args, dev: torch.device, tmp: str) -> dict[str, str]:
    """shape -> checkpoint folder. SmolLM2-sized models are written in float32 on the CPU
    (the correctness checks run float32); larger ones in bfloat16 on `dev`."""
    if args.model:
        return {"model": args.model}
    folders = {}
    for shape in args.shapes:
        t0 = time.perf_counter()
        big = SHAPES[shape]["hidden_size"] >= 1024
        folders[shape] = write_random_model(
            shape, os.path.join(tmp, shape), args.tokenizer_from,
            device=dev if big else "cpu", dtype=torch.bfloat16 if big else torch.float32)
        print(f"random {shape}: written in {time.perf_counter() - t0:.1f} s", flush=True)
    return folders


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="a checkpoint folder, used for everything instead of the random shapes")
    p.add_argument("--tokenizer-from", default=None, help="tokenizer files for random models")
    p.add_argument("--shapes", nargs="+", default=["smollm2", "llama-3.2-1b"],
                   choices=sorted(SHAPES), help="random model shapes (random_model.SHAPES); "
                   "the correctness checks run on the first")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=32, help="decode tokens per throughput run")
    p.add_argument("--greedy-tokens", type=int, default=32, help="new tokens per greedy check")
    p.add_argument("--skip-hf", action="store_true", help="no HF speed runs")
    p.add_argument("--skip-checks", action="store_true", help="speed only")
    p.add_argument("--hf-compile", type=int, nargs="*", default=[], metavar="BATCH",
                   help="also HF with a static cache and torch.compile at these batches "
                        "(each batch compiles first, for an unmeasured while: none by "
                        "default, to keep the run under 5 minutes)")
    args = p.parse_args(argv)
    if args.model is None and not args.tokenizer_from:
        p.error("--tokenizer-from is needed without --model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    t_start = time.perf_counter()
    graph_log = GraphLog()
    logging.getLogger("tandem.graphs").addHandler(graph_log)
    logging.getLogger("tandem.graphs").setLevel(logging.INFO)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"model {args.model or 'random ' + ', '.join(args.shapes)}", flush=True)
    gates: list[Gate] = []
    results: dict[str, ShapeResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_models(args, dev, tmp)
        first = next(iter(folders.values()))
        if not args.skip_checks:
            n = args.greedy_tokens
            run_section(gates, "HF greedy", check_hf_greedy, first, dev, n)
            run_section(gates, "graphs x backends", check_graphs_backends, first, dev, n)
            run_section(gates, "bf16 logits", check_bf16_logits, first, dev)
            run_section(gates, "fp8 graphs", check_fp8_graphs, first, dev, n)
            run_section(gates, "int4", check_int4, first, dev, n, args.prompt_len)
        for shape, folder in folders.items():
            print(f"speed, {shape}:", flush=True)
            results[shape] = measure_shape(shape, folder, dev, args, graph_log, gates)
        bandwidth = copy_bandwidth(dev)
    ok = report(name, gates, results, args, bandwidth, time.perf_counter() - t_start)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

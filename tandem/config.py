"""Engine settings; the CLI flags and `LLM(...)` keywords are these fields by name."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from dataclasses import dataclass

import torch

from tandem.attention.backend import BACKENDS
from tandem.quantization.int4 import GROUP_SIZES as INT4_GROUP_SIZES

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(value: int | str, name: str = "kv_cache_memory") -> int:
    """Bytes from an int or a string such as '2GiB', '512MiB' or '1e9'."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}: cannot read {value!r} as a size (e.g. 2GiB, 512MiB)")
        try:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        except (ValueError, OverflowError):
            raise ValueError(f"{name}: cannot read {value!r} as a size") from None
    if n <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return n


@dataclass
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_memory: int | str | None = None
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    decode_weight_dtype: str = "auto"
    quantization: str = "auto"
    quantization_group_size: int = 32
    dense_weight_copy: bool = False
    kv_host_memory: int | str = 0  # bytes of host memory for evicted blocks; 0 = off
    kv_store: str | None = None  # redis://host:port[/db] or file:///dir
    kv_store_timeout: float = 1.0
    kv_store_write_through: bool = False
    # {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...}
    # (tandem/spec/config.py), or its JSON
    speculative_config: dict | str | None = None
    # TANDEM_ENFORCE_EAGER=1 makes eager the default: the test suite builds hundreds of engines,
    # and tracing each under coverage would cost minutes; tests/engine/test_compile.py asks for
    # compilation explicitly.
    enforce_eager: bool = dataclasses.field(
        default_factory=lambda: _env_flag("TANDEM_ENFORCE_EAGER"))
    # auto: triton on CUDA, torch elsewhere (attention/backend.py)
    attention_backend: str = "auto"
    max_cudagraph_batch: int = 256  # decode steps of up to this many rows replay CUDA graphs
    seed: int = 0
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    # torchrun's variables are the defaults, so `env://`-style launches need no flags.
    master_addr: str = dataclasses.field(
        default_factory=lambda: os.environ.get("MASTER_ADDR", "127.0.0.1"))
    master_port: int | None = dataclasses.field(
        default_factory=lambda: int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ
        else None)

    def __post_init__(self) -> None:
        if self.speculative_config is not None:
            from tandem.spec.config import SpeculativeConfig

            self.speculative_config = SpeculativeConfig.parse(self.speculative_config).to_dict()
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.kv_host_memory not in (0, "0"):
            self.kv_host_memory = parse_size(self.kv_host_memory, "kv_host_memory")
        else:
            self.kv_host_memory = 0
        if not (isinstance(self.kv_store_timeout, (int, float))
                and 0 < self.kv_store_timeout <= 60):
            raise ValueError(f"kv_store_timeout: must be in (0, 60] seconds, "
                             f"got {self.kv_store_timeout!r}")
        if self.kv_store_write_through and not self.kv_store:
            raise ValueError("kv_store_write_through: needs kv_store")
        if (self.kv_store or self.kv_host_memory) and not self.enable_prefix_caching:
            raise ValueError("kv_store: the KV tiers hold prefix-cached blocks; they need "
                             "prefix caching on")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs",
                     "max_cudagraph_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be positive, got {self.max_model_len!r}")
        for name in ("tensor_parallel_size", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"nnodes: {self.nnodes} nodes cannot split "
                             f"{self.tensor_parallel_size} ranks evenly")
        if (self.tensor_parallel_size > 1 and self.speculative_config is not None
                and self.speculative_config["method"] == "draft_model"):
            # The draft would load as this process's shard of a TP model; it needs its own
            # one-rank model state, which the layers (parallel_state) do not support yet.
            raise ValueError("speculative_config.method: draft_model does not run with "
                             "tensor_parallel_size > 1 yet; use ngram")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank: must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("master_port: required with several nodes (and --master-addr, "
                             "the address of node 0)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.decode_weight_dtype not in DECODE_WEIGHT_DTYPES:
            raise ValueError(f"decode_weight_dtype: must be one of "
                             f"{', '.join(DECODE_WEIGHT_DTYPES)}, got {self.decode_weight_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.quantization_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization_group_size: must be one of "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))}, "
                             f"got {self.quantization_group_size!r}")
        if self.quantization_group_size != 32 and self.quantization != "int4":
            raise ValueError("quantization_group_size: only with quantization 'int4' (a GGUF's "
                             "4-bit blocks are 32 wide)")
        if self.dense_weight_copy and self.quantization == "none":
            raise ValueError("dense_weight_copy: only for quantized weights (--quantization)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend: must be one of {', '.join(BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if (self.attention_backend == "triton" and self.torch_device.type != "cuda"
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError("attention_backend: triton runs on CUDA (on the CPU only under "
                             "Triton's interpreter, TRITON_INTERPRET=1, for tests)")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.bfloat16 if fast_bf16(self.torch_device) else torch.float32

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# "fp8" is vLLM's alias for e4m3 (more mantissa; e5m2 trades it for range).
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}
# "auto": the model's weights only. A 16-bit copy halves the bytes a one- or two-row step reads
# (the CPU is memory-bound there) at the cost of 16-bit activations in those steps.
DECODE_WEIGHT_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
# gguf: a .gguf model's Q4_0/Q4_1 projections served as stored, through PyTorch's int4 kernel
# (activations rounded to bfloat16 there); int4/int8: an HF folder's projections quantized while
# loading; none: every weight dequantized to --dtype; auto: gguf for a .gguf model, else none.
QUANTIZATIONS = ("auto", "none", "gguf", "int4", "int8")


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}: must be 0 or 1, got {value!r}")
    return value == "1"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float8_e4m3fn': how logs and metric labels name a dtype."""
    return str(dtype).removeprefix("torch.")


def fast_bf16(device: torch.device) -> bool:
    """bfloat16 only where the hardware computes it natively; emulated it is slower than fp32.
    On the CPU, TANDEM_CPU_BF16=0|1 overrides the cpuinfo probe, so one machine can take the
    other kind's branch (the test suite runs its dtype-sensitive tests both ways)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    override = os.environ.get("TANDEM_CPU_BF16", "")
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise ValueError(f"TANDEM_CPU_BF16: must be 0 or 1, got {override!r}")
    return cpu_has_bf16()


def cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@functools.cache
def cpu_isa() -> str:
    """AMX, AVX512, AVX2 or DEFAULT: what ATen's CPU kernels run with here."""
    isa = torch.backends.cpu.get_cpu_capability()
    return "AMX" if isa == "AVX512" and "amx_bf16" in cpu_flags() else isa


def cpu_has_bf16() -> bool:
    """What /proc/cpuinfo says: AMX or AVX-512 bfloat16 instructions."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_kv_cache_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(2 * 1024**3, available // 8)


def argument_group(p: argparse.ArgumentParser, title: str,
                   description: str | None = None) -> argparse._ArgumentGroup:
    """`p`'s group of this title, made on first use: the helpers that add flags to one parser
    (engine, server, router, and later ones) file theirs under shared headings in `--help`."""
    for group in p._action_groups:
        if group.title == title:
            return group
    return p.add_argument_group(title, description)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The EngineConfig flags, in the groups model, KV cache, scheduling, speculative decoding
    and parallelism."""
    d = EngineConfig()
    model = argument_group(p, "model")
    model.add_argument("--model", default=d.model,
                       help="HF checkpoint folder, a .gguf file, or the alias 'smollm2'")
    model.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                       help="weights and activations; auto: bfloat16 where the hardware computes "
                            "it natively, else float32")
    model.add_argument("--device", default=d.device,
                       help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    model.add_argument("--quantization", default=d.quantization, choices=QUANTIZATIONS,
                       help="gguf: serve a .gguf model's Q4_0/Q4_1 weights at 4 bits (CPU; the "
                            "default for a .gguf model); int4/int8: quantize an HF folder's "
                            "projections while loading; none: dense weights in --dtype; auto: "
                            "gguf for a .gguf model, else none")
    model.add_argument("--quantization-group-size", type=int, default=d.quantization_group_size,
                       help="columns sharing one scale and zero with --quantization int4")
    model.add_argument("--dense-weight-copy", action="store_true",
                       help="quantized layers also keep a dense copy (bfloat16 where the CPU "
                            "computes it, else float32) for steps of many rows, where it is "
                            "faster; costs its memory (weight_bytes in the start-up line)")
    model.add_argument("--decode-weight-dtype", default=d.decode_weight_dtype,
                       choices=list(DECODE_WEIGHT_DTYPES),
                       help="float16/bfloat16: steps of at most 2 tokens read a 16-bit copy of "
                            "the weights (faster single-stream decode on CPU; more memory); "
                            "auto: the model's weights only")
    model.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt plus output, in tokens (default: the model's "
                            "context length)")
    model.add_argument("--enforce-eager", action="store_true", default=d.enforce_eager,
                       help="run the model eagerly: no torch.compile of the decode step on "
                            "CPU, no CUDA graphs on GPU (default: off; on where "
                            "TANDEM_ENFORCE_EAGER=1)")
    model.add_argument("--attention-backend", default=d.attention_backend, choices=BACKENDS,
                       help="triton: this repo's paged-attention kernels (GPU); torch: the "
                            "PyTorch reference; auto: triton on CUDA, torch elsewhere")
    model.add_argument("--max-cudagraph-batch", type=int, default=d.max_cudagraph_batch,
                       help="on CUDA, decode steps of up to this many rows replay CUDA graphs "
                            "captured at start (off with --enforce-eager)")
    model.add_argument("--seed", type=int, default=d.seed, help="seed of the engine's sampling")

    cache = argument_group(p, "KV cache")
    cache.add_argument("--kv-cache-memory", default=None,
                       help="bytes for the KV cache, e.g. 2GiB (default: from free memory: "
                            "85%% of free GPU memory, or on CPU an eighth of available memory "
                            "up to 2GiB)")
    cache.add_argument("--block-size", type=int, default=d.block_size,
                       help="tokens per KV cache block")
    cache.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype,
                       choices=list(KV_CACHE_DTYPES),
                       help="auto: the model dtype; fp8_*: float8 with per-token, per-head scales")
    cache.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                       action="store_false",
                       help="do not reuse the KV blocks of a prompt prefix seen before "
                            "(default: prefix caching on)")
    cache.add_argument("--kv-host-memory", default=d.kv_host_memory,
                       help="host memory for KV blocks evicted from the cache, e.g. 4GiB (0: off)")
    cache.add_argument("--kv-store", default=None,
                       help="a KV block store shared by replicas: redis://host:port[/db] or "
                            "file:///dir (default: none)")
    cache.add_argument("--kv-store-timeout", type=float, default=d.kv_store_timeout,
                       help="seconds any one store call may take")
    cache.add_argument("--kv-store-write-through", action="store_true",
                       help="write every full block to the store once computed, not only when "
                            "evicted, so other replicas see it at once")

    sched = argument_group(p, "scheduling")
    sched.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                       help="tokens one engine step computes at most (prefill chunks included)")
    sched.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                       help="requests running at once; the rest wait")

    spec = argument_group(p, "speculative decoding")
    spec.add_argument("--speculative-config", default=None,
                      help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
                           '"num_speculative_tokens": 4, "prompt_lookup_max": 5}\' or '
                           '\'{"method": "draft_model", "model": PATH, '
                           '"num_speculative_tokens": 4}\' (default: none, one token a step)')

    # `serve` adds --data-parallel-size here (tandem/server/launch.py).
    par = argument_group(p, "parallelism")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                     help="ranks that split every layer (gloo on CPU, NCCL on CUDA)")
    par.add_argument("--nnodes", type=int, default=d.nnodes, help="hosts the ranks span")
    par.add_argument("--node-rank", type=int, default=d.node_rank,
                     help="this host's index; node 0 serves, the others only compute")
    par.add_argument("--master-addr", default=d.master_addr,
                     help="node 0's address (in-cluster); $MASTER_ADDR where set")
    par.add_argument("--master-port", type=int, default=d.master_port,
                     help="rendezvous port on node 0 (default: $MASTER_PORT, else a free one, "
                          "single node only)")

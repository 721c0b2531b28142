"""Owns the model and its KV tensors; turns a scheduled step into one forward pass and samples."""
from __future__ import annotations

import functools

import torch

from tandem.attention.backend import get_backend, resolve_backend
from tandem.attention.kv_quant import SCALE_DTYPE, is_fp8
from tandem.attention.layer import Attention
from tandem.attention.metadata import AttentionMetadata, PrefillSeq, set_metadata
from tandem.config import (
    DECODE_WEIGHT_DTYPES,
    KV_CACHE_DTYPES,
    EngineConfig,
    default_kv_cache_memory,
    fast_bf16,
)
from tandem.distributed.group import TPGroup
from tandem.distributed.step import StepInputs
from tandem.engine.compile import compile_model, step_stance
from tandem.engine.graph_runner import MASKED_GRAPH_TOKENS, GraphRunner
from tandem.engine.kv_cache import cdiv
from tandem.engine.request import Request
from tandem.engine.scheduler import SchedulerOutput
from tandem.layers.linear import add_decode_copies
from tandem.layers.sampler import Sampler, logprob_entries
from tandem.loader.weights import load_model, resolve_quantization
from tandem.models.registry import model_class
from tandem.quantization.weight import prepare_q8
from tandem.spec.verify import verify


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, folder: str,
                 group: TPGroup | None = None, device: torch.device | None = None,
                 num_blocks: int | None = None):
        """`num_blocks` sizes the KV pool in blocks instead of by config.kv_cache_memory."""
        self.group = group or TPGroup()
        self.device, self.dtype = device or config.torch_device, config.torch_dtype
        self.block_size = config.block_size
        self.kv_dtype = KV_CACHE_DTYPES[config.kv_cache_dtype] or self.dtype
        torch.manual_seed(config.seed)
        self.quantization = resolve_quantization(config.model, folder, config.quantization,
                                                 self.device)
        if config.dense_weight_copy and self.quantization == "none":
            raise ValueError("dense_weight_copy: only for quantized weights (--quantization)")
        dense = ((torch.bfloat16 if fast_bf16(self.device) else torch.float32)
                 if config.dense_weight_copy else None)
        self.model = load_model(model_class(hf_config), hf_config, folder, self.device, self.dtype,
                                self.quantization, dense, config.quantization_group_size)
        decode_dtype = DECODE_WEIGHT_DTYPES[config.decode_weight_dtype]
        if decode_dtype is not None:
            add_decode_copies(self.model, decode_dtype)
        self.sampler = Sampler()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.attention_backend = resolve_backend(config.attention_backend, self.device)
        self.backend = get_backend(self.attention_backend)
        for layer in self.attn_layers:
            layer.backend = self.backend
        memory = config.kv_cache_memory or default_kv_cache_memory(self.device)
        # Every rank holds its own heads of the same blocks: the smallest pool decides.
        self.num_blocks = num_blocks or self.group.all_reduce_min(memory // self.bytes_per_block)
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory: {memory} bytes hold no block of "
                             f"{self.bytes_per_block} bytes")
        a = self.attn_layers[0]
        # One block more than the pool: the sink, where padded rows of a captured decode step
        # write their K/V (graph_runner.py). No request owns it.
        shape = (2, len(self.attn_layers), a.num_kv_heads, self.num_blocks + 1, self.block_size)
        # Zeroed, not empty: padded gathers read unused blocks, and NaN garbage survives masking.
        # Stored layer-major, so that a layer's K and V are one contiguous tensor: a compiled
        # graph that writes it in place (attention/paged_decode.py) must not take two aliasing
        # views (AOTAutograd then copies the whole storage on every call). `kv_cache` keeps
        # the [2, layers, ...] order for everyone else (the KV tiers).
        layer_major = torch.zeros(shape[1], shape[0], *shape[2:], a.head_dim,
                                  dtype=self.kv_dtype, device=self.device)
        self.kv_cache = layer_major.transpose(0, 1)
        self.kv_scale = (torch.zeros(shape, dtype=SCALE_DTYPE, device=self.device)
                         if is_fp8(self.kv_dtype) else None)
        for i, layer in enumerate(self.attn_layers):
            layer.kv_cache = layer_major[i]
            layer.k_cache, layer.v_cache = layer_major[i, 0], layer_major[i, 1]
            if self.kv_scale is not None:
                layer.k_scale, layer.v_scale = self.kv_scale[0, i], self.kv_scale[1, i]
        self.compiled = compile_model(self, config)
        prepare_q8(self.model, config.enforce_eager)
        self.graphs: GraphRunner | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            max_len = config.max_model_len or hf_config.max_position_embeddings
            if self.backend.decode_mask:  # it attends to the whole captured width every step
                max_len = min(max_len, MASKED_GRAPH_TOKENS)
            self.graphs = GraphRunner(self, config.max_cudagraph_batch,
                                      min(cdiv(max_len, self.block_size), self.num_blocks))

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of this rank's weights as served: parameters, 4-bit kernels' packed tensors
        and scales, and 16-bit decode copies."""
        tensors = [*self.model.parameters()]
        for m in self.model.modules():
            quant = getattr(m, "quant", None)
            tensors += [t for t in (*(quant.tensors if quant else ()),
                                    getattr(m, "lowp", None), getattr(m, "dense", None))
                        if t is not None]
        # a tied LM head shares the embedding's quantized table: count each tensor once
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    @property
    def bytes_per_block(self) -> int:
        a = self.attn_layers[0]
        per_token_head = a.head_dim * self.kv_dtype.itemsize
        if is_fp8(self.kv_dtype):
            per_token_head += SCALE_DTYPE.itemsize
        return 2 * len(self.attn_layers) * self.block_size * a.num_kv_heads * per_token_head

    def prepare(self, sched: SchedulerOutput
                ) -> tuple[StepInputs, list[Request], list[tuple[Request, int]]]:
        """Flat batch with one-token steps (decodes, and the rows of proposed tokens) first, the
        request of each row that samples (a request verifying proposed tokens has one per
        proposal, plus one), and each request collecting prompt logprobs with its number of
        prompt rows, in the order of `prompt_rows`."""
        bs = self.block_size
        # A request verifying proposed tokens is laid out as one decode row per token, each
        # attending to the cache up to its own position: the decode path's cost, not a prefill's.
        order = sorted(zip(sched.requests, sched.num_tokens),
                       key=lambda rn: rn[1] != 1 and not rn[0].spec_token_ids)
        input_ids, positions, slots, sample_rows, sample_reqs = [], [], [], [], []
        decode_tables, decode_lens, prefills, prefill_tables = [], [], [], []
        prompt_rows, prompt_reqs = [], []
        for req, n in order:
            start, bt = req.num_computed_tokens, req.block_table
            q_start = len(input_ids)
            spec = req.spec_token_ids
            tokens = req.all_token_ids + spec if spec else req.all_token_ids
            input_ids += tokens[start:start + n]
            positions += range(start, start + n)
            slots += [bt[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n == 1 or spec:
                for pos in range(start, start + n):
                    decode_tables.append(bt[:cdiv(pos + 1, bs)])
                    decode_lens.append(pos + 1)
            else:
                prefills.append((q_start, n, start))
                prefill_tables += bt[:cdiv(start + n, bs)]
            if start + n == len(tokens):  # the last token's row, and each proposed token's
                for row in range(q_start + n - 1 - len(spec), q_start + n):
                    sample_rows.append(row)
                    sample_reqs.append(req)
            if req.prompt_logprobs is not None:
                # Position p's row predicts prompt token p + 1. A recompute after preemption
                # passes over positions already collected: only the others.
                first = max(start, len(req.prompt_logprobs))
                last = min(start + n, req.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows += range(q_start + first - start, q_start + last - start)
                    prompt_reqs.append((req, last - first))
        width = max((len(t) for t in decode_tables), default=0)

        def t(x) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64)

        inputs = StepInputs(t(input_ids), t(positions), t(slots),
                            t([b + [0] * (width - len(b)) for b in decode_tables]).view(len(decode_tables), width),
                            t(decode_lens), t(prefills).view(-1, 3), t(prefill_tables),
                            t(sample_rows), t(prompt_rows))
        return inputs, sample_reqs, prompt_reqs

    def metadata(self, inp: StepInputs) -> AttentionMetadata:
        """What every attention layer reads, built the same way on every rank."""
        bs, dev = self.block_size, self.device
        meta = AttentionMetadata(inp.slots, inp.decode_lens.numel())
        if meta.num_decode:
            width = inp.decode_tables.shape[1]
            meta.decode_block_tables, meta.decode_lens = inp.decode_tables, inp.decode_lens
            if self.backend.decode_mask:
                meta.decode_mask = additive((torch.arange(width * bs, device=dev)[None, :]
                                             < inp.decode_lens[:, None])[None, :, None, :],
                                            self.dtype)
        at = 0
        # (no .tolist() of an empty tensor: a copy to the host is not allowed in a graph capture)
        for q_start, n, start in inp.prefills.tolist() if inp.prefills.numel() else ():
            nb = cdiv(start + n, bs)
            mask = None
            if start:  # causal past the cached tokens
                mask = additive(torch.arange(start + n, device=dev)[None, :]
                                <= torch.arange(n, device=dev)[:, None] + start, self.dtype)
            meta.prefills.append(PrefillSeq(q_start, n, start + n,
                                            inp.prefill_tables[at:at + nb], mask))
            at += nb
        return meta

    def decode_inputs(self, inp: StepInputs, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        """What the compiled layers of a step that only decodes take, so that its attention is
        traced into their graph (attention/paged_decode.py): (slots, block tables, context
        lengths); () for any other step, and with a float8 cache."""
        if meta.prefills or not meta.num_decode or self.kv_scale is not None:
            return ()
        tables = inp.decode_tables
        if tables.shape[1] == 1:  # Dynamo would give a width of 1 graphs of its own
            tables = torch.nn.functional.pad(tables, (0, 1))
        torch._dynamo.maybe_mark_dynamic(tables, 1)  # one graph for every context length
        return inp.slots, tables, inp.decode_lens

    def hidden_states(self, inp: StepInputs) -> torch.Tensor:
        """The forward pass, eagerly (or through torch.compile's graphs on the CPU)."""
        meta = self.metadata(inp)
        set_metadata(meta)
        try:
            with step_stance(self.compiled):
                return self.model(inp.input_ids, inp.positions,
                                  self.decode_inputs(inp, meta) if self.compiled else ())
        finally:
            set_metadata(None)

    @torch.inference_mode()
    def run(self, inp: StepInputs) -> torch.Tensor | None:
        """The forward pass, replayed from a CUDA graph where one fits the step; on rank 0 the
        logits of the sampled rows, then of the prompt rows (None on other ranks)."""
        if self.graphs is not None and self.graphs.fits(inp):
            hidden = self.graphs.run(inp)
        else:
            hidden = self.hidden_states(inp)
        rows = inp.sample_rows
        if inp.prompt_rows.numel():
            rows = torch.cat([rows, inp.prompt_rows])
        if not rows.numel():
            return None
        return self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def forward_logits(self, sched: SchedulerOutput) -> tuple[list[Request], torch.Tensor | None]:
        """The requests of the sampled rows and, on rank 0, their logits."""
        reqs, logits, _ = self._forward(sched)
        return reqs, logits

    def _forward(self, sched: SchedulerOutput) -> tuple[list[Request], torch.Tensor | None,
                                                        list[tuple[Request, torch.Tensor]]]:
        """forward_logits, plus each request collecting prompt logprobs with its prompt rows'
        logits."""
        inp, reqs, prompt_reqs = self.prepare(sched)
        inp = StepInputs(*(getattr(inp, f).to(self.device) for f in StepInputs._FIELDS))
        with self.group.step(inp):
            logits = self.run(inp)
        if logits is None:
            return reqs, None, []
        prompt_logits = logits[len(reqs):].split([n for _, n in prompt_reqs])
        return (reqs, logits[:len(reqs)] if reqs else None,
                [(req, x) for (req, _), x in zip(prompt_reqs, prompt_logits)])

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[tuple[Request, list[int], list | None]]:
        """Each request that sampled: its new tokens (one, or with speculation the accepted
        proposed tokens and one more) and, if it asked, a logprobs entry per token. Requests
        collecting prompt logprobs get this step's prompt positions' entries."""
        rows, logits, prompt_logits = self._forward(sched)
        for req, x in prompt_logits:
            # A slice at a time: a chunk's float32 log-softmax would hold a vocabulary per row.
            for part in x.split(256):
                at = len(req.prompt_logprobs)  # entry p predicts prompt token p + 1
                targets = torch.tensor(req.prompt_token_ids[at + 1:at + 1 + len(part)],
                                       device=part.device)
                req.prompt_logprobs += logprob_entries(part, targets,
                                                       [req.params.prompt_logprobs] * len(part))
        if logits is None:
            return []
        spans: list[tuple[Request, int, int]] = []  # request, first row, rows
        for i, req in enumerate(rows):
            if spans and spans[-1][0] is req:
                spans[-1] = (req, spans[-1][1], spans[-1][2] + 1)
            else:
                spans.append((req, i, 1))
        plain = [(req, i) for req, i, n in spans if n == 1]
        out: dict[int, tuple[Request, list[int], list | None]] = {}
        if plain:
            result = self.sampler(logits[[i for _, i in plain]], [req for req, _ in plain])
            for j, (req, i) in enumerate(plain):
                lp = result.logprobs[j]
                out[i] = (req, [result.token_ids[j]], None if lp is None else [lp])
        for req, i, n in spans:
            if n > 1:
                out[i] = (req, *verify(self.sampler, logits[i:i + n], req, req.spec_token_ids))
        return [out[i] for _, i, _ in spans]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the float one SDPA adds: made once a step, where every
    layer's SDPA would convert a boolean mask again."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf"))

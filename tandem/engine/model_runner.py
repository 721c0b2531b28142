"""Owns the model and its KV tensors; turns a scheduled step into one forward pass and samples."""
from __future__ import annotations

import torch

from tandem.attention.backend import get_backend
from tandem.attention.kv_quant import SCALE_DTYPE, is_fp8
from tandem.attention.layer import Attention
from tandem.attention.metadata import AttentionMetadata, PrefillSeq, set_metadata
from tandem.config import KV_CACHE_DTYPES, EngineConfig, default_kv_cache_memory
from tandem.engine.kv_cache import cdiv
from tandem.engine.request import Request
from tandem.engine.scheduler import SchedulerOutput
from tandem.layers.sampler import Sampler, SampleResult
from tandem.loader.weights import load_model
from tandem.models.registry import model_class


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, folder: str):
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.block_size = config.block_size
        self.kv_dtype = KV_CACHE_DTYPES[config.kv_cache_dtype] or self.dtype
        torch.manual_seed(config.seed)
        self.model = load_model(model_class(hf_config), hf_config, folder, self.device, self.dtype)
        self.sampler = Sampler()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        backend = get_backend(self.device)
        for layer in self.attn_layers:
            layer.backend = backend
        memory = config.kv_cache_memory or default_kv_cache_memory(self.device)
        self.num_blocks = memory // self.bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory: {memory} bytes hold no block of "
                             f"{self.bytes_per_block} bytes")
        a = self.attn_layers[0]
        shape = (2, len(self.attn_layers), a.num_kv_heads, self.num_blocks, self.block_size)
        # Zeroed, not empty: padded gathers read unused blocks, and NaN garbage survives masking.
        self.kv_cache = torch.zeros(*shape, a.head_dim, dtype=self.kv_dtype, device=self.device)
        self.kv_scale = (torch.zeros(shape, dtype=SCALE_DTYPE, device=self.device)
                         if is_fp8(self.kv_dtype) else None)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
            if self.kv_scale is not None:
                layer.k_scale, layer.v_scale = self.kv_scale[0, i], self.kv_scale[1, i]

    @property
    def bytes_per_block(self) -> int:
        a = self.attn_layers[0]
        per_token_head = a.head_dim * self.kv_dtype.itemsize
        if is_fp8(self.kv_dtype):
            per_token_head += SCALE_DTYPE.itemsize
        return 2 * len(self.attn_layers) * self.block_size * a.num_kv_heads * per_token_head

    def prepare(self, sched: SchedulerOutput):
        """Flat batch with one-token steps (decodes) first; returns the model inputs, the
        attention metadata, and the rows and requests that sample."""
        bs, dev = self.block_size, self.device
        order = sorted(zip(sched.requests, sched.num_tokens), key=lambda rn: rn[1] != 1)
        input_ids, positions, slots, sample_rows, sample_reqs = [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        for req, n in order:
            start, bt = req.num_computed_tokens, req.block_table
            q_start = len(input_ids)
            input_ids += req.all_token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [bt[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n == 1:
                decode_tables.append(bt[:cdiv(start + 1, bs)])
                decode_lens.append(start + 1)
            else:
                mask = None
                if start:
                    mask = (torch.arange(start + n, device=dev)[None, :]
                            <= torch.arange(n, device=dev)[:, None] + start)
                prefills.append(PrefillSeq(q_start, n, start + n, torch.tensor(
                    bt[:cdiv(start + n, bs)], device=dev), mask))
            if start + n == req.num_tokens:
                sample_rows.append(q_start + n - 1)
                sample_reqs.append(req)
        meta = AttentionMetadata(torch.tensor(slots, device=dev), len(decode_lens),
                                 prefills=prefills)
        if decode_lens:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t))
                                                     for t in decode_tables], device=dev)
            lens = torch.tensor(decode_lens, device=dev)
            meta.decode_mask = (torch.arange(width * bs, device=dev)[None, :]
                                < lens[:, None])[None, :, None, :]
        ids = torch.tensor(input_ids, device=dev)
        return ids, torch.tensor(positions, device=dev), meta, sample_rows, sample_reqs

    @torch.inference_mode()
    def forward_logits(self, sched: SchedulerOutput) -> tuple[list[Request], torch.Tensor | None]:
        ids, positions, meta, rows, reqs = self.prepare(sched)
        set_metadata(meta)
        try:
            hidden = self.model(ids, positions)
        finally:
            set_metadata(None)
        if not rows:
            return reqs, None
        return reqs, self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[Request], SampleResult | None]:
        reqs, logits = self.forward_logits(sched)
        if logits is None:
            return reqs, None
        return reqs, self.sampler(logits, reqs)

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from tandem.attention.backend import AttentionBackend
from tandem.attention.metadata import get_metadata
from tandem.attention.paged_decode import paged_decode

# Layers by id, for the custom op below: what it reads (caches, backend, the step's metadata)
# stays out of the compiled graph, as vLLM's unified attention op keeps it.
_layers: weakref.WeakValueDictionary[int, Attention] = weakref.WeakValueDictionary()
_ids = itertools.count()


class Attention(nn.Module):
    """Holds one layer's KV cache (assigned by the model runner) and calls the backend."""

    backend: AttentionBackend | None = None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.k_cache = self.v_cache = torch.empty(0)
        self.kv_cache = torch.empty(0)  # [2, ...]: k_cache and v_cache as one tensor
        self.k_scale: torch.Tensor | None = None  # per-token scales of a float8 cache
        self.v_scale: torch.Tensor | None = None
        index = next(_ids)
        _layers[index] = self
        # A tensor, not an int: Dynamo specializes on a module's int attributes, which would
        # compile the decoder layer once per layer instead of once.
        self.layer_id = torch.tensor(index)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                decode: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """`decode`: (slots, block tables, context lengths) when a compiled step only decodes
        (ModelRunner.decode_inputs): its attention is traced into the graph. Otherwise the
        step's metadata (metadata.py) says what to do, eagerly."""
        if torch.compiler.is_compiling():
            if decode:
                return paged_decode(q, k, v, self.kv_cache, *decode)
            return torch.ops.tandem.attention(q, k, v, self.layer_id)
        return self.attend(q, k, v)  # eager: no dispatcher round trip

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_metadata(),
                                    self.k_scale, self.v_scale)


# Opaque to torch.compile: the paged-cache writes and per-step Python control flow (decodes,
# each prefill) run eagerly, and the compiled graph never depends on the step's batch layout.
@torch.library.custom_op("tandem::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              layer_id: torch.Tensor) -> torch.Tensor:
    return _layers[int(layer_id)].attend(q, k, v)


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)

"""What a stored KV block is: its key, and a value of a small header plus raw tensor bytes.

The key is the block's chained hash (which already covers cache_salt) under a fingerprint of
everything that makes K/V incompatible: model identity, layer count, KV heads, head dim, cache
dtype, block size, tensor-parallel size and rank. The value repeats the fingerprint and the hash
in its header, with the shapes, dtypes and a CRC-32 of the payload, so a value that is corrupt or
sits under the wrong key is recognised and dropped. No pickle: JSON header, raw bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import torch

from tandem.config import dtype_name

MAGIC = b"TKVB"
VERSION = 1
_PREFIX = struct.Struct("<4sI")  # magic, header length
_MAX_HEADER = 4096
DROP_REASONS = ("header", "version", "layout", "hash", "checksum")


class BadBlock(ValueError):
    """A stored value that must not be used; `reason` labels the drop counter."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class BlockLayout:
    """Everything two engines must share to use each other's K/V blocks."""

    model: str  # a digest of the model's config and quantization (see engine_model_id)
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    block_size: int
    dtype: str  # the cache dtype: float32, bfloat16, float8_e4m3fn ...
    scale_dtype: str | None  # per-token scales of a float8 cache, else None
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def fingerprint(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """One block across the model: [K/V, layers, kv heads, block_size, head_dim]."""
        return (2, self.num_layers, self.num_kv_heads, self.block_size, self.head_dim)

    def key(self, block_hash: bytes) -> str:
        return f"tandem:kv:v{VERSION}:{self.fingerprint}:{block_hash.hex()}"


def engine_model_id(hf_config_dict: dict, quantization: str) -> str:
    """Two engines share K/V only if the same weights compute it: the model's architecture
    config and how its weights are served (quantized weights give other K/V)."""
    keep = {k: v for k, v in hf_config_dict.items() if not k.startswith("_")
            and k not in ("transformers_version", "torch_dtype", "dtype")}
    text = json.dumps({"config": keep, "quantization": quantization}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def encode(layout: BlockLayout, block_hash: bytes, kv: torch.Tensor,
           scale: torch.Tensor | None) -> bytes:
    """kv: layout.kv_shape in layout.dtype; scale: kv_shape[:-1] (float8 caches only)."""
    payload = _raw(kv) + (_raw(scale) if scale is not None else b"")
    header = json.dumps({
        "version": VERSION, "layout": layout.fingerprint, "hash": block_hash.hex(),
        "shape": list(kv.shape), "dtype": dtype_name(kv.dtype),
        "scale_dtype": dtype_name(scale.dtype) if scale is not None else None,
        "payload_bytes": len(payload), "crc32": zlib.crc32(payload),
    }).encode()
    return _PREFIX.pack(MAGIC, len(header)) + header + payload


def decode(layout: BlockLayout, block_hash: bytes, value: bytes
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block's K/V (and scales) from a stored value; BadBlock if anything disagrees."""
    if len(value) < _PREFIX.size:
        raise BadBlock("header", f"{len(value)} bytes is shorter than the prefix")
    magic, header_len = _PREFIX.unpack_from(value)
    if magic != MAGIC or header_len > _MAX_HEADER:
        raise BadBlock("header", "not a Tandem KV block")
    try:
        header = json.loads(value[_PREFIX.size:_PREFIX.size + header_len])
        version, fingerprint, hash_hex = header["version"], header["layout"], header["hash"]
        shape, dtype = header["shape"], header["dtype"]
        scale_dtype, size, crc = header["scale_dtype"], header["payload_bytes"], header["crc32"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadBlock("header", f"unreadable header ({e})") from None
    if version != VERSION:
        raise BadBlock("version", f"format version {version!r}, this engine reads {VERSION}")
    if fingerprint != layout.fingerprint or shape != list(layout.kv_shape) \
            or dtype != layout.dtype or scale_dtype != layout.scale_dtype:
        raise BadBlock("layout", "written by an engine with another model, shape or dtype")
    if hash_hex != block_hash.hex():
        raise BadBlock("hash", "the value belongs to another block")
    payload = value[_PREFIX.size + header_len:]
    if len(payload) != size or zlib.crc32(payload) != crc:
        raise BadBlock("checksum", "payload does not match its checksum")
    kv_dtype = getattr(torch, dtype)
    n = kv_dtype.itemsize
    for d in shape:
        n *= d
    scale_bytes = (n // kv_dtype.itemsize // shape[-1] * getattr(torch, scale_dtype).itemsize
                   if scale_dtype is not None else 0)
    if len(payload) != n + scale_bytes:  # a header that vouches for a payload of another size
        raise BadBlock("layout", f"{len(payload)} payload bytes do not fill the shape "
                                 f"({n + scale_bytes} bytes)")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    kv = raw[:n].view(kv_dtype).view(shape)
    scale = raw[n:].view(getattr(torch, scale_dtype)).view(shape[:-1]) if scale_dtype else None
    return kv, scale

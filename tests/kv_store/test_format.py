"""A stored KV block on its own: keys and values, no engine. A value decodes bit for bit into
what was encoded; anything that makes it unusable (a flipped byte, another engine's layout,
another block's hash, a truncated or foreign value, another format version) is refused with
the reason the drop counter is labelled by, never with another exception."""
from __future__ import annotations

import dataclasses
import json
import math
import zlib

import pytest
import torch

from tandem.engine.kv_cache import hash_block
from tandem.kv_store.format import (
    _MAX_HEADER,
    _PREFIX,
    DROP_REASONS,
    MAGIC,
    VERSION,
    BadBlock,
    BlockLayout,
    decode,
    encode,
    engine_model_id,
)

F32 = BlockLayout(model="a" * 32, num_layers=2, num_kv_heads=3, head_dim=8, block_size=4,
                  dtype="float32", scale_dtype=None)
FP8 = dataclasses.replace(F32, dtype="float8_e4m3fn", scale_dtype="bfloat16")
HASH = hash_block(None, [1, 2, 3, 4])
OTHER_HASH = hash_block(HASH, [5, 6, 7, 8])


def f32_block(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(F32.kv_shape, generator=g)
    # Values a lossy or normalising path would change: -0.0, infinities, a NaN with a payload,
    # a subnormal.
    flat = kv.view(-1)
    flat[:4] = torch.tensor([-0.0, float("inf"), float("-inf"), 1e-45])
    flat.view(torch.int32)[4] = 0x7FC0_1234
    return kv


def fp8_block(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Every bit pattern, NaNs included, may sit in a float8 cache.
    kv = torch.randint(0, 256, FP8.kv_shape, dtype=torch.uint8, generator=g)
    scale = torch.rand(FP8.kv_shape[:-1], generator=g).to(torch.bfloat16)
    return kv.view(torch.float8_e4m3fn), scale


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def split(value: bytes) -> tuple[dict, bytes]:
    magic, n = _PREFIX.unpack_from(value)
    assert magic == MAGIC
    return json.loads(value[_PREFIX.size:_PREFIX.size + n]), value[_PREFIX.size + n:]


def join(header: dict | bytes, payload: bytes, magic: bytes = MAGIC) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return _PREFIX.pack(magic, len(raw)) + raw + payload


def refused(layout: BlockLayout, block_hash: bytes, value: bytes) -> str:
    with pytest.raises(BadBlock) as e:
        decode(layout, block_hash, value)
    assert e.value.reason in DROP_REASONS
    assert str(e.value).startswith(e.value.reason + ": ")
    return e.value.reason


def test_float32_block_roundtrips_bit_exact():
    kv = f32_block()
    value = encode(F32, HASH, kv, None)
    header, payload = split(value)
    assert header["version"] == VERSION and header["layout"] == F32.fingerprint
    assert header["hash"] == HASH.hex() and header["shape"] == list(F32.kv_shape)
    assert len(payload) == kv.numel() * 4 == header["payload_bytes"]
    out, scale = decode(F32, HASH, value)
    assert scale is None
    assert same_bits(out, kv)


def test_fp8_block_with_bfloat16_scales_roundtrips_bit_exact():
    kv, scale = fp8_block()
    value = encode(FP8, HASH, kv, scale)
    out, out_scale = decode(FP8, HASH, value)
    assert same_bits(out, kv)
    assert same_bits(out_scale, scale)
    # a quarter of the float32 payload, plus 2 bytes of scale per head_dim values
    assert len(split(value)[1]) == kv.numel() + scale.numel() * 2


def test_encode_accepts_a_non_contiguous_view():
    # The engine hands over slices of its pool ([K/V, layers, heads, blocks, ...][:, :, :, i]).
    pool = torch.randn(2, 2, 3, 5, 4, 8)
    view = pool[:, :, :, 2]
    assert not view.is_contiguous()
    out, _ = decode(F32, HASH, encode(F32, HASH, view, None))
    assert same_bits(out, view.contiguous())


def test_decoded_block_owns_its_memory():
    # The reader installs decoded tensors into the pool and may write them: they must not
    # alias the (immutable) value they came from.
    value = encode(F32, HASH, f32_block(), None)
    out, _ = decode(F32, HASH, value)
    before = out.clone()
    out.add_(1)
    again, _ = decode(F32, HASH, value)
    assert same_bits(again, before)


@pytest.mark.parametrize("where", [0, 1000, -1])
def test_a_flipped_payload_byte_fails_the_checksum(where):
    value = bytearray(encode(F32, HASH, f32_block(), None))
    payload_start = len(value) - math.prod(F32.kv_shape) * 4
    i = payload_start + where if where >= 0 else len(value) + where
    value[i] ^= 0x01
    assert refused(F32, HASH, bytes(value)) == "checksum"


def test_a_flipped_scale_byte_fails_the_checksum():
    kv, scale = fp8_block()
    value = bytearray(encode(FP8, HASH, kv, scale))
    value[-1] ^= 0x80  # the last byte is a scale's
    assert refused(FP8, HASH, bytes(value)) == "checksum"


def test_a_truncated_or_extended_payload_fails_the_checksum():
    value = encode(F32, HASH, f32_block(), None)
    assert refused(F32, HASH, value[:-1]) == "checksum"
    assert refused(F32, HASH, value + b"\0") == "checksum"


def test_a_value_written_under_another_layout_is_refused():
    value = encode(F32, HASH, f32_block(), None)
    for other in (dataclasses.replace(F32, model="b" * 32), dataclasses.replace(F32, tp_rank=1),
                  dataclasses.replace(F32, tp_size=2), dataclasses.replace(F32, block_size=8),
                  dataclasses.replace(F32, dtype="bfloat16")):
        assert refused(other, HASH, value) == "layout"
    # Another cache dtype: an fp8 engine must not read float32 K/V, nor the other way round.
    kv, scale = fp8_block()
    assert refused(FP8, HASH, value) == "layout"
    assert refused(F32, HASH, encode(FP8, HASH, kv, scale)) == "layout"


def test_a_header_that_disagrees_with_the_layout_is_refused():
    # The fingerprint matches, but the shape or dtypes written do not: never reinterpret bytes.
    value = encode(F32, HASH, f32_block(), None)
    header, payload = split(value)
    for change in ({"shape": [2, 2, 3, 8, 4]}, {"dtype": "float16"},
                   {"scale_dtype": "bfloat16"}):
        assert refused(F32, HASH, join(header | change, payload)) == "layout"


def test_a_value_of_another_block_is_refused():
    value = encode(F32, HASH, f32_block(), None)
    assert refused(F32, OTHER_HASH, value) == "hash"


def test_another_format_version_is_refused():
    header, payload = split(encode(F32, HASH, f32_block(), None))
    for version in (VERSION + 1, 0, "1"):
        assert refused(F32, HASH, join(header | {"version": version}, payload)) == "version"


@pytest.mark.parametrize("value", [
    b"", b"TKV", b"TKVB\x10\0\0", b"garbage that is not a block at all",
    bytes(range(256)) * 8,
], ids=["empty", "short", "prefix-only", "text", "binary"])
def test_foreign_values_are_refused_as_header(value):
    assert refused(F32, HASH, value) == "header"


def test_malformed_headers_are_refused_as_header():
    value = encode(F32, HASH, f32_block(), None)
    header, payload = split(value)
    cases = {
        "wrong magic": b"XKVB" + value[4:],
        "truncated header": value[:_PREFIX.size + 20],
        "header length past the limit": _PREFIX.pack(MAGIC, _MAX_HEADER + 1) + value[8:],
        "header length past the value": _PREFIX.pack(MAGIC, len(value)) + value[8:],
        "not JSON": join(b"{not json", payload),
        "not UTF-8": join(b"\xff\xfe{}", payload),
        "a list": join(b"[1, 2]", payload),
        "a string": join(b'"version"', payload),
        "missing field": join({k: v for k, v in header.items() if k != "crc32"}, payload),
    }
    for name, bad in cases.items():
        assert refused(F32, HASH, bad) == "header", name


def crc_ok(header: dict, payload: bytes) -> bytes:
    """A value whose header vouches for `payload`: only the shape can be wrong."""
    return join(header | {"payload_bytes": len(payload), "crc32": zlib.crc32(payload)}, payload)


def test_a_payload_that_does_not_fill_the_shape_is_refused():
    # A header that checks out against its own payload, but the payload is not the size its
    # shape says: BadBlock (so the reader counts a drop), not an exception from torch.
    header, payload = split(encode(F32, HASH, f32_block(), None))
    for bad in (payload[:-4], payload[:-3], payload + b"\0" * 4, b""):
        assert refused(F32, HASH, crc_ok(header, bad)) == "layout"
    kv, scale = fp8_block()
    header, payload = split(encode(FP8, HASH, kv, scale))
    for bad in (payload[:-2], payload[:-1], payload + b"\0\0", payload[:kv.numel()]):
        assert refused(FP8, HASH, crc_ok(header, bad)) == "layout"


def test_every_drop_reason_is_a_metric_label():
    # Each reason above labels kv_store_dropped_blocks_total; an unlisted one would be lost.
    assert set(DROP_REASONS) == {"header", "version", "layout", "hash", "checksum"}


def test_fingerprint_is_stable_and_names_every_field():
    assert F32.fingerprint == BlockLayout(**dataclasses.asdict(F32)).fingerprint
    assert len(F32.fingerprint) == 32 and int(F32.fingerprint, 16) >= 0
    changes = {"model": "b" * 32, "num_layers": 3, "num_kv_heads": 1, "head_dim": 16,
               "block_size": 8, "dtype": "bfloat16", "scale_dtype": "bfloat16", "tp_size": 2,
               "tp_rank": 1}
    assert set(changes) == {f.name for f in dataclasses.fields(BlockLayout)}
    prints = {dataclasses.replace(F32, **{k: v}).fingerprint for k, v in changes.items()}
    assert len(prints) == len(changes) and F32.fingerprint not in prints


def test_key_names_the_layout_and_the_block():
    key = F32.key(HASH)
    assert key == f"tandem:kv:v{VERSION}:{F32.fingerprint}:{HASH.hex()}"
    assert key.isascii() and " " not in key
    assert F32.key(OTHER_HASH) != key
    for other in (dataclasses.replace(F32, model="b" * 32), dataclasses.replace(F32, tp_rank=1),
                  dataclasses.replace(F32, dtype="bfloat16"), FP8,
                  dataclasses.replace(F32, block_size=8)):
        assert other.key(HASH) != key


def test_kv_shape_is_one_block_across_the_model():
    assert F32.kv_shape == (2, 2, 3, 4, 8)


def test_engine_model_id_ignores_bookkeeping_but_not_the_model():
    config = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
              "torch_dtype": "bfloat16", "transformers_version": "4.50.0",
              "_name_or_path": "/some/folder"}
    base = engine_model_id(config, "none")
    assert len(base) == 32
    # Where the checkpoint sits, which transformers wrote it and its stored dtype do not change
    # the K/V the engine computes (the serving dtype is in the layout's cache dtype).
    same = config | {"torch_dtype": "float32", "transformers_version": "4.57.1",
                     "_name_or_path": "/elsewhere", "dtype": "float16"}
    assert engine_model_id(same, "none") == base
    assert engine_model_id(config | {"num_hidden_layers": 29}, "none") != base
    assert engine_model_id(config | {"rope_theta": 10000.0}, "none") != base
    assert engine_model_id(config, "q4") != base  # quantized weights give other K/V


"""The torch backend's decode attention over paged K/V, on both of its routes (SDPA for a few
decodes, two batched matmuls from BMM_MIN_DECODES on the CPU), against plain attention over
each request's own unpaged keys and values; and the compiled layers' decode attention
(paged_decode.py) against both."""
import pytest
import torch
import torch.nn.functional as F

from tandem.attention import torch_ref
from tandem.attention.metadata import AttentionMetadata
from tandem.attention.paged_decode import paged_decode
from tandem.attention.torch_ref import TorchAttention
from tandem.engine.model_runner import additive

KVH, GROUP, D, BS, BLOCKS = 3, 3, 16, 4, 256


def _decode_batch(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 7 * BS, (n,), generator=g).tolist()  # ragged, partial last blocks
    width = max((n_ + BS - 1) // BS for n_ in lens)
    free = torch.randperm(BLOCKS, generator=g).tolist()
    tables = torch.zeros(n, width, dtype=torch.int64)
    k_cache = torch.zeros(KVH, BLOCKS, BS, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    keys, values, slots = [], [], []
    for i, length in enumerate(lens):
        blocks = [free.pop() for _ in range((length + BS - 1) // BS)]
        tables[i, :len(blocks)] = torch.tensor(blocks)
        k = torch.randn(length, KVH, D, generator=g).to(dtype)
        v = torch.randn(length, KVH, D, generator=g).to(dtype)
        at = [blocks[p // BS] * BS + p % BS for p in range(length)]
        # All but the newest token are already cached; the step writes that one.
        k_cache.view(KVH, -1, D)[:, at[:-1]] = k[:-1].transpose(0, 1)
        v_cache.view(KVH, -1, D)[:, at[:-1]] = v[:-1].transpose(0, 1)
        keys.append(k)
        values.append(v)
        slots.append(at[-1])
    mask = additive(torch.arange(width * BS)[None, :] < torch.tensor(lens)[:, None], dtype)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), num_decode=n,
                             decode_block_tables=tables, decode_mask=mask[None, :, None, :])
    q = torch.randn(n, KVH * GROUP, D, generator=g).to(dtype)
    new_k = torch.stack([k[-1] for k in keys])
    new_v = torch.stack([v[-1] for v in values])
    return q, new_k, new_v, k_cache, v_cache, meta, keys, values


def _reference(q, keys, values):
    out = []
    for i, (k, v) in enumerate(zip(keys, values)):
        o = F.scaled_dot_product_attention(q[i, :, None].float(), k.transpose(0, 1).float(),
                                           v.transpose(0, 1).float(), enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("n", [1, 5, torch_ref.BMM_MIN_DECODES, 3 * torch_ref.BMM_MIN_DECODES])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_paged_decode_matches_unpaged_attention(n, dtype, atol):
    q, k, v, k_cache, v_cache, meta, keys, values = _decode_batch(n, dtype)
    out = TorchAttention().forward(q, k, v, k_cache, v_cache, meta)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference(q, keys, values), atol=atol, rtol=0)


def test_both_routes_agree(monkeypatch):
    q, k, v, k_cache, v_cache, meta, _, _ = _decode_batch(2 * torch_ref.BMM_MIN_DECODES,
                                                          torch.float32, seed=1)
    bmm = TorchAttention().forward(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    monkeypatch.setattr(torch_ref, "BMM_MIN_DECODES", 10**9)
    sdpa = TorchAttention().forward(q, k, v, k_cache, v_cache, meta)
    torch.testing.assert_close(bmm, sdpa, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def compiled_paged_decode():
    # Dynamic rows and width from the first call: one graph for every batch below.
    return torch.compile(paged_decode, fullgraph=True, dynamic=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("n", [1, 3, 2 * torch_ref.BMM_MIN_DECODES])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_paged_decode_math_matches_the_backend(n, dtype, atol, compiled, compiled_paged_decode):
    """attention/paged_decode.py, the compiled layers' decode attention: the backend's cache
    writes, and its outputs within the dtype's rounding of unpaged attention."""
    q, k, v, k_cache, v_cache, meta, keys, values = _decode_batch(n, dtype, seed=n)
    kv = torch.stack((k_cache, v_cache))
    TorchAttention().forward(q, k, v, k_cache, v_cache, meta)
    lens = torch.tensor([len(x) for x in keys])
    fn = compiled_paged_decode if compiled else paged_decode
    out = fn(q, k, v, kv, meta.slot_mapping, meta.decode_block_tables, lens)
    assert torch.equal(kv[0], k_cache) and torch.equal(kv[1], v_cache)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference(q, keys, values), atol=atol, rtol=0)

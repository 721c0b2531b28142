"""The Triton backend's kernels (GPU code) on the CPU under Triton's interpreter: the cache
write against kv_quant.write (same bits), paged decode against TorchAttention, a mixed step
through both backends, and greedy generation of a tiny model through both.

The interpreter (set up in conftest.py) runs the kernels' code with NumPy. It cannot show
what only a GPU decides (speed, registers, tl.dot's MMA lowering): the last test compiles the
kernels for sm_90 instead, without running them. It truncates where a GPU rounds a float32 to
bfloat16, so bfloat16 decode results are compared with a bfloat16 tolerance.
"""
import os
import subprocess
import sys

import pytest
import torch
import triton
from helpers import save_tiny_model

from tandem import LLM, SamplingParams
from tandem.attention import kv_quant
from tandem.attention.metadata import AttentionMetadata, PrefillSeq
from tandem.attention.torch_ref import TorchAttention
from tandem.attention.triton import TritonAttention
from tandem.attention.triton_kernels import paged_decode_attention, reshape_and_cache
from tandem.engine.kv_cache import cdiv
from tandem.engine.model_runner import additive
from tandem.loader.gguf import convert_gguf

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def make_caches(kvh: int, blocks: int, bs: int, d: int, cache_dtype: torch.dtype,
                transposed: bool = False):
    """K and V caches as views of one layer-major tensor, as the model runner holds them
    ([2, layers, KVH, blocks, block_size, D]); `transposed`: blocks lead in memory instead, so
    the kernels' strides are all non-trivial."""
    if transposed:
        kv = torch.zeros(2, 2, blocks, kvh, bs, d, dtype=cache_dtype).transpose(2, 3)
    else:
        kv = torch.zeros(2, 2, kvh, blocks, bs, d, dtype=cache_dtype)
    if cache_dtype not in FP8:
        return kv[0, 1], kv[1, 1], None, None
    scales = torch.zeros(2, 2, kvh, blocks, bs, dtype=kv_quant.SCALE_DTYPE)
    return kv[0, 1], kv[1, 1], scales[0, 1], scales[1, 1]


def clone_caches(caches):
    return [None if c is None else c.clone() for c in caches]


def attend(backend, q, k, v, caches, meta) -> torch.Tensor:
    k_cache, v_cache, k_scale, v_scale = caches
    return backend.forward(q, k, v, k_cache, v_cache, meta, k_scale, v_scale)


def cache_bits(caches) -> list[torch.Tensor]:
    return [c.view(torch.uint8) if c.dtype in FP8 else c for c in caches if c is not None]


@pytest.mark.parametrize("cache_dtype,dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float8_e4m3fn, torch.float32), (torch.float8_e4m3fn, torch.bfloat16),
    (torch.float8_e5m2, torch.float32), (torch.float8_e5m2, torch.bfloat16)])
def test_reshape_and_cache_stores_what_kv_quant_stores(cache_dtype, dtype):
    g = torch.Generator().manual_seed(0)
    t, kvh, d, blocks, bs = 7, 2, 48, 4, 8
    # Spread magnitudes per token (scales differ), with zeros and values small enough to land
    # on float8 subnormals or flush to (signed) zero.
    k = (torch.randn(t, kvh, d, generator=g) * torch.logspace(-3, 3, t)[:, None, None]).to(dtype)
    v = torch.randn(t, kvh, d, generator=g).to(dtype)
    k[0, 0] = 0.0
    v[1, 0, :4] = torch.tensor([1e-6, -1e-6, -0.0, 1e-3])
    v[1, 0, 4] = 100.0
    slots = torch.randperm(blocks * bs, generator=g)[:t]
    for transposed in (False, True):
        triton_caches = make_caches(kvh, blocks, bs, d, cache_dtype, transposed)
        torch_caches = make_caches(kvh, blocks, bs, d, cache_dtype)  # kv_quant: contiguous
        kc, vc, ks, vs = triton_caches
        k_seen, v_seen = reshape_and_cache(k, v, kc, vc, slots, ks, vs)
        kc, vc, ks, vs = torch_caches
        k_ref = kv_quant.write(kc, ks, k, slots)
        v_ref = kv_quant.write(vc, vs, v, slots)
        for a, b in zip(cache_bits(triton_caches), cache_bits(torch_caches)):
            assert torch.equal(a, b)
        # Bits, not values: -0.0 must stay -0.0, as in torch.
        int_dtype = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(k_seen.view(int_dtype), k_ref.view(int_dtype))
        assert torch.equal(v_seen.view(int_dtype), v_ref.view(int_dtype))


def decode_step(lens: list[int], kvh: int, group: int, d: int, bs: int, dtype: torch.dtype,
                cache_dtype: torch.dtype, seed: int = 0):
    """Decode rows attending to `lens` tokens each, all but the newest already cached in
    shuffled blocks; returns q, the new k and v, the caches and the step's metadata."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(cdiv(n, bs) for n in lens) + 3
    caches = make_caches(kvh, num_blocks, bs, d, cache_dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    width = max(cdiv(n, bs) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)  # zero-padded, as the runner's
    new_slots, new_k, new_v = [], [], []
    for i, n in enumerate(lens):
        blocks = [free.pop() for _ in range(cdiv(n, bs))]
        tables[i, :len(blocks)] = torch.tensor(blocks)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)])
        k = torch.randn(n, kvh, d, generator=g).to(dtype)
        v = torch.randn(n, kvh, d, generator=g).to(dtype)
        kv_quant.write(caches[0], caches[2], k[:-1], slots[:-1])
        kv_quant.write(caches[1], caches[3], v[:-1], slots[:-1])
        new_slots.append(slots[-1])
        new_k.append(k[-1])
        new_v.append(v[-1])
    lens_t = torch.tensor(lens)
    mask = additive(torch.arange(width * bs)[None, :] < lens_t[:, None], dtype)
    meta = AttentionMetadata(torch.stack(new_slots), len(lens), tables, lens_t,
                             mask[None, :, None, :])
    q = torch.randn(len(lens), kvh * group, d, generator=g).to(dtype)
    return q, torch.stack(new_k), torch.stack(new_v), caches, meta


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("group,d", [(1, 64), (3, 48), (4, 80)])
@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e5m2)])
def test_paged_decode_matches_torch(group, d, dtype, cache_dtype):
    bs = 16
    # Ragged: one token, partial and exactly full blocks, one past a block, several blocks
    # (the kernel steps 16 keys at a time, so the last rows take several steps).
    lens = [1, bs - 1, bs, bs + 1, 3 * bs + 5, 5 * bs]
    q, k, v, caches, meta = decode_step(lens, 2, group, d, bs, dtype, cache_dtype)
    torch_caches = clone_caches(caches)
    out = attend(TritonAttention(), q, k, v, caches, meta)
    ref = attend(TorchAttention(), q, k, v, torch_caches, meta)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    for a, b in zip(cache_bits(caches), cache_bits(torch_caches)):
        assert torch.equal(a, b)


def test_decode_with_odd_block_size_and_strided_inputs():
    """A block size that does not divide the kernel's key step, a cache whose blocks lead in
    memory, and q and out as views into larger tensors."""
    bs, kvh, group, d = 5, 2, 2, 32
    lens = [1, 4, 5, 6, 23, 41]
    q, k, v, caches, meta = decode_step(lens, kvh, group, d, bs, torch.float32, torch.float32)
    strided = make_caches(kvh, caches[0].shape[1], bs, d, torch.float32, transposed=True)
    strided[0].copy_(caches[0])
    strided[1].copy_(caches[1])
    reshape_and_cache(k, v, *strided[:2], meta.slot_mapping)
    qkv = torch.randn(len(lens), kvh * group + 2 * kvh, d)  # q, k, v projections side by side
    qkv[:, :kvh * group] = q
    out = torch.full((len(lens) + 2, kvh * group, d), float("nan"))
    paged_decode_attention(qkv[:, :kvh * group], *strided[:2], meta.decode_block_tables,
                           meta.decode_lens, None, None, out)
    ref = attend(TorchAttention(), q, k, v, caches, meta)
    torch.testing.assert_close(out[:len(lens)], ref, atol=1e-5, rtol=1e-5)
    assert out[len(lens):].isnan().all()  # rows past the decodes are left alone


@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float8_e4m3fn)])
def test_mixed_step_matches_torch(dtype, cache_dtype):
    """Two decodes, a prefill chunk over a cached prefix and a fresh prefill in one step, with
    metadata laid out as ModelRunner.metadata builds it."""
    g = torch.Generator().manual_seed(1)
    kvh, group, d, bs = 2, 3, 48, 8
    q_dec, k_dec, v_dec, caches, meta = decode_step([3, 2 * bs + 1], kvh, group, d, bs, dtype,
                                                    cache_dtype)
    num_blocks = caches[0].shape[1]
    bigger = make_caches(kvh, num_blocks + 8, bs, d, cache_dtype)
    for big, small in zip(bigger, caches):
        if big is not None:
            big[:, :num_blocks] = small
    caches = bigger
    # Prefill 1: 11 cached tokens (blocks num_blocks, +1), 6 new ones; prefill 2: 9 new tokens.
    cached, new, fresh = 11, 6, 9
    table1 = torch.tensor([num_blocks + 1, num_blocks, num_blocks + 2])
    table2 = torch.tensor([num_blocks + 5, num_blocks + 3])

    def slots(table, positions):
        return torch.tensor([int(table[p // bs]) * bs + p % bs for p in positions])

    past = torch.randn(cached, kvh, d, generator=g).to(dtype)
    kv_quant.write(caches[0], caches[2], past, slots(table1, range(cached)))
    kv_quant.write(caches[1], caches[3], -past, slots(table1, range(cached)))
    n = 2 + new + fresh
    q = torch.cat([q_dec, torch.randn(n - 2, kvh * group, d, generator=g).to(dtype)])
    k = torch.cat([k_dec, torch.randn(n - 2, kvh, d, generator=g).to(dtype)])
    v = torch.cat([v_dec, torch.randn(n - 2, kvh, d, generator=g).to(dtype)])
    meta.slot_mapping = torch.cat([meta.slot_mapping, slots(table1, range(cached, cached + new)),
                                   slots(table2, range(fresh))])
    causal = additive(torch.arange(cached + new)[None, :]
                      <= torch.arange(new)[:, None] + cached, dtype)
    meta.prefills = [PrefillSeq(2, new, cached + new, table1, causal),
                     PrefillSeq(2 + new, fresh, fresh, table2)]
    torch_caches = clone_caches(caches)
    out = attend(TritonAttention(), q, k, v, caches, meta)
    ref = attend(TorchAttention(), q, k, v, torch_caches, meta)
    torch.testing.assert_close(out[:2], ref[:2], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(out[2:], ref[2:])  # prefills: SDPA on the same values
    for a, b in zip(cache_bits(caches), cache_bits(torch_caches)):
        assert torch.equal(a, b)


def test_cache_layout_errors():
    k = torch.randn(2, 2, 16)
    slots = torch.tensor([0, 1])
    kc, vc, ks, vs = make_caches(2, 2, 4, 16, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs k_scale"):
        reshape_and_cache(k, k, kc, vc, slots)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        reshape_and_cache(k, k, kc, vc, slots, ks, vs.float())
    kc, vc, _, _ = make_caches(2, 2, 4, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="cache dtype"):
        reshape_and_cache(k, k, kc, vc, slots)
    with pytest.raises(ValueError, match="one shape, layout and dtype"):
        reshape_and_cache(k, k, kc, vc.contiguous().transpose(0, 1).contiguous()
                          .transpose(0, 1), slots)
    with pytest.raises(ValueError, match="do not fit"):
        q = torch.randn(1, 3, 16, dtype=torch.bfloat16)
        paged_decode_attention(q, kc, vc, torch.zeros(1, 1, dtype=torch.int64), torch.ones(1),
                               None, None, torch.empty_like(q))


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf, tmp_path_factory) -> str:
    """A random Llama with groups of 3 query heads of 24 dims, and the tiny GGUF's tokenizer."""
    tokenizer = str(tmp_path_factory.mktemp("tokenizer") / "hf")
    convert_gguf(tiny_gguf, tokenizer)
    return save_tiny_model(tmp_path_factory.mktemp("model"), tokenizer_dir=tokenizer,
                           vocab_size=300, hidden_size=144, num_attention_heads=6,
                           num_key_value_heads=2)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_generation_matches_torch_backend(tiny_model, kv_cache_dtype):
    """Greedy tokens of the engine (eager, float32) through both backends: a prompt longer
    than a block, one sharing its first two blocks (a prefix-cache hit), a short one, and
    enough decodes to cross block boundaries."""
    shared = [(11 * j) % 240 + 5 for j in range(17)]
    first = [{"prompt_token_ids": shared + [7, 8, 9]}]
    rest = [{"prompt_token_ids": shared + [40, 41]}, {"prompt_token_ids": [50, 51, 52]}]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=tiny_model, attention_backend=backend, device="cpu", dtype="float32",
                  enforce_eager=True, kv_cache_dtype=kv_cache_dtype, block_size=8,
                  kv_cache_memory=2**20)
        assert type(llm.engine.runner.backend).__name__ == f"{backend.title()}Attention"
        outs = llm.generate(first, greedy) + llm.generate(rest, greedy)
        assert llm.engine.scheduler.prefix_cache_hits >= 16
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["triton"] == tokens["torch"]


def test_padded_graph_steps_match_torch_backend(tiny_model):
    """The CUDA-graph runner's buffers and padding (engine/graph_runner.py, run without a
    capture) with this backend: padded rows attend to the sink slot alone through decode_lens,
    and the real rows' tokens are the torch backend's, eager."""
    from tandem.engine.graph_runner import GraphRunner
    from tandem.engine.kv_cache import cdiv

    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 240 + 5 for j in range(3 + 5 * i)]}
               for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + 3 * i, ignore_eos=True)
              for i in range(6)]
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=tiny_model, attention_backend=backend, device="cpu", dtype="float32",
                  enforce_eager=True, block_size=8, kv_cache_memory=2**20)
        if backend == "triton":
            runner = llm.engine.runner
            runner.graphs = GraphRunner(runner, 4, cdiv(llm.engine.max_model_len, 8),
                                        capture=False)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["torch"]
    assert set(runner.graphs.outputs) >= {4}  # steps of 3 rows or fewer replayed padded


def test_kernels_compile_for_h100():
    """What the interpreter cannot show: the kernels go through Triton's GPU compiler and
    ptxas for sm_90 (no GPU needed), with correctly rounded divisions in the cache write."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        __file__)), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]


def compile_for_sm90() -> None:
    """Run as a script, without TRITON_INTERPRET: decode and cache write, bfloat16 and float8
    caches, head_dim 80 (padded to 128), groups of 3."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tandem.attention import triton_kernels as tk

    def compile_(fn, pointers: dict[str, str], constexprs: dict, num_warps: int):
        constexprs |= {name: 1 for name in fn.arg_names if name.endswith("stride_d")}
        signature = {name: "constexpr" if name in constexprs else pointers.get(
            name, "fp32" if name == "qk_scale" else "i64" if "stride" in name else "i32")
            for name in fn.arg_names}
        return triton.compile(ASTSource(fn, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps}).asm["ptx"]

    for cache, fp8, grid in [("bf16", False, (0, 0, 0.0)), ("fp8e4nv", True, (3, -6, 448.0)),
                             ("fp8e5", True, (2, -14, 57344.0))]:
        scales = {} if fp8 else {"k_scale_ptr": None, "v_scale_ptr": None, "s_stride_h": 0,
                                 "s_stride_b": 0, "s_stride_s": 0}
        caches = {"k_cache_ptr": "*" + cache, "v_cache_ptr": "*" + cache,
                  "k_scale_ptr": "*bf16", "v_scale_ptr": "*bf16"}
        compile_(tk._paged_decode_kernel,
                 caches | {"q_ptr": "*bf16", "out_ptr": "*bf16", "tables_ptr": "*i64",
                           "lens_ptr": "*i64"},
                 scales | {"BLOCK_SIZE": 16, "GROUP": 3, "GROUP_PAD": 16, "D": 80,
                           "D_PAD": 128, "BLOCK_N": tk.DECODE_BLOCK_N, "FP8": fp8,
                           "PRECISION": "tf32"}, 4)
        ptx = compile_(tk._reshape_and_cache_kernel,
                       caches | {name: "*bf16" for name in ("k_ptr", "v_ptr", "k_out_ptr",
                                                             "v_out_ptr")}
                       | {"slot_ptr": "*i64"},
                       scales | {"BLOCK_SIZE": 16, "D": 80, "D_PAD": 128, "FP8": fp8,
                                 "FP8_MANTISSA": grid[0], "FP8_MIN_EXP": grid[1],
                                 "FP8_MAX": grid[2]}, 1)
        assert not fp8 or "div.rn.f32" in ptx


if __name__ == "__main__":
    compile_for_sm90()

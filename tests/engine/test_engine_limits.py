"""The engine under tight limits: chunked prefill, a KV pool too small for the batch
(recompute preemption), the context window. These use the 2-layer random Llama from the
conftest's GGUF, which loads at once; the tokens it produces mean nothing, but they must
not depend on how the work was split."""
import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from tandem import LLM, SamplingParams
from tandem.engine.engine import _max_model_len

# 2 layers x (K, V) x 16 tokens x 2 KV heads x 16 dims x 4 bytes (float32)
TINY_BLOCK_BYTES = 8192
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 250 + 3 for j in range(20 + 5 * i)]}
           for i in range(3)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def tiny(tiny_dir: str, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 2**20)
    return LLM(model=tiny_dir, dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_dir) -> list[list[int]]:
    llm = tiny(tiny_dir)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def check_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_chunked_prefill_gives_the_same_tokens(tiny_dir, reference):
    llm = tiny(tiny_dir, max_num_batched_tokens=7)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    check_idle(llm)


def test_preemption_by_recompute_gives_the_same_tokens(tiny_dir, reference):
    # 24 blocks of 4 tokens hold 96 tokens; the three requests need 105 at the end.
    llm = tiny(tiny_dir, kv_cache_memory=6 * TINY_BLOCK_BYTES, block_size=4,
               enable_prefix_caching=False)
    assert llm.engine.kv.num_blocks == 24
    outs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions >= 1, "the pool never ran dry"
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    check_idle(llm)


def test_one_sequence_at_a_time_gives_the_same_tokens(tiny_dir, reference):
    llm = tiny(tiny_dir, max_num_seqs=1)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    check_idle(llm)


def test_kv_cache_too_small_for_one_block(tiny_dir):
    with pytest.raises(ValueError, match=r"^kv_cache_memory: .*hold no block"):
        tiny(tiny_dir, kv_cache_memory=TINY_BLOCK_BYTES - 1)


def test_prompt_beyond_kv_capacity(tiny_dir):
    llm = tiny(tiny_dir, kv_cache_memory=2 * TINY_BLOCK_BYTES)
    assert llm.engine.kv_capacity_tokens == 32
    with pytest.raises(ValueError, match=r"^max_tokens: .*KV cache capacity of 32 tokens"):
        llm.generate({"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=13))
    out = llm.generate({"prompt_token_ids": [5] * 20},
                       SamplingParams(max_tokens=12, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 12 and out[0].prompt is None
    check_idle(llm)


def test_max_model_len_caps_the_context(tiny_dir):
    llm = tiny(tiny_dir, max_model_len=24)
    with pytest.raises(ValueError, match=r"^max_tokens: .*maximum context length is 24"):
        llm.generate({"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=5))
    (out,) = llm.generate({"prompt_token_ids": [5] * 20},
                          SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4


def test_model_limits_from_the_config():
    assert _max_model_len(LlamaConfig(max_position_embeddings=2048), None) == 2048
    assert _max_model_len(LlamaConfig(max_position_embeddings=2048), 100) == 100
    # Sliding-window attention is not implemented: the context stops where the window starts.
    mistral = MistralConfig(max_position_embeddings=32768, sliding_window=4096)
    assert _max_model_len(mistral, None) == 4096
    with pytest.raises(ValueError, match=r"^max_model_len: 8192 exceeds .* 4096"):
        _max_model_len(mistral, 8192)
    assert _max_model_len(MistralConfig(max_position_embeddings=32768, sliding_window=None),
                          None) == 32768
    qwen = Qwen2Config(max_position_embeddings=32768, sliding_window=4096,
                       use_sliding_window=False)
    assert _max_model_len(qwen, None) == 32768

"""The router computes exactly the block hashes the engine stores for a request."""
from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.request import Request
from tandem.engine.sampling_params import SamplingParams
from tandem.loader.tokenizer import render_chat
from tandem.router.engine_keys import EngineKeys, block_keys


def engine_hashes(ids: list[int], salt: str | None = None) -> list[bytes]:
    kv = KVCacheManager(num_blocks=64, block_size=16)
    req = Request("r", ids, SamplingParams(max_tokens=1), cache_salt=salt)
    kv.update_hashes(req)
    return req.block_hashes


def test_keys_match_the_engine_for_prompts_chats_and_salts(smollm2_dir):
    keys = EngineKeys(smollm2_dir)
    text = "The quick brown fox jumps over the lazy dog. " * 10
    ids = keys.token_ids({"prompt": text})
    assert ids == keys.tokenizer.encode(text) and len(ids) > 32
    assert block_keys(ids, 16) == engine_hashes(ids)
    assert block_keys(ids, 16, "tenant") == engine_hashes(ids, "tenant") != block_keys(ids, 16)
    messages = [{"role": "user", "content": text}]
    assert keys.token_ids({"messages": messages}) == render_chat(keys.tokenizer, messages)[1]
    assert keys.token_ids({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert keys.token_ids({"prompt": 3}) is None
    assert keys.token_ids({"messages": [{"role": 7}]}) is None

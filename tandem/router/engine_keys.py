"""Tandem replicas' own block hashes for a request, so cache-aware routing can match the
engine's real cache (its /kv/events) instead of guessing from text.

The router tokenizes as the replica does: the chat template for messages, plain encoding for
a string prompt, token ids as given; then it chains the engine's block hash over every full
block (docs/kv_cache.md). Needs `tandem route --tokenizer` (the replicas' model folder).
"""
from __future__ import annotations

from tandem.engine.kv_cache import hash_block


class EngineKeys:
    def __init__(self, model: str):
        from tandem.loader.model_path import resolve_model
        from tandem.loader.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(resolve_model(model))

    def token_ids(self, body: dict) -> list[int] | None:
        try:
            if isinstance(body.get("messages"), list):
                # The replica's own rendering: its tools and fallback prompt change the prefix.
                from tandem.server.protocol import ChatCompletionRequest
                from tandem.server.tools import plan_tools, render_messages

                req = ChatCompletionRequest.model_validate(body)
                tools = plan_tools(req, "hermes").tools  # the parser does not change the prompt
                return render_messages(self.tokenizer, req.messages, tools,
                                       req.add_generation_prompt)[1]
            p = body.get("prompt")
            if isinstance(p, str):
                return self.tokenizer.encode(p)
            if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                return p
        except Exception:  # noqa: BLE001 - a body the replica will reject: route it anywhere
            return None
        return None


def block_keys(ids: list[int], block_size: int, salt: str | None = None) -> list[bytes]:
    keys, parent = [], None
    for i in range(len(ids) // block_size):
        parent = hash_block(parent, ids[i * block_size:(i + 1) * block_size],
                            salt if i == 0 else None)
        keys.append(parent)
    return keys

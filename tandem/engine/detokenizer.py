"""Incremental detokenization that never emits a partial UTF-8 character, and stop strings."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Decoding a few tokens of context keeps leading spaces and merges right (as vLLM does).
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int],
                 stop: list[str], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.skip = skip_special_tokens
        self.text = ""
        # While streaming, hold back what could still become the start of a stop string.
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token; returns the stop string if the text now contains one (and cuts it)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0] if check_stop else []
        if not hits:
            return None
        idx, stop = min(hits)
        self.text = self.text[:idx]
        return stop

    def output_text(self, finished: bool) -> str:
        if finished or not self.hold:
            return self.text
        return self.text[:max(0, len(self.text) - self.hold)]

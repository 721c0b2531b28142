"""Compiled grammars for one tokenizer, cached per request spec, and the matcher a request
advances token by token; its bitmask sets the logits of disallowed tokens to -inf."""
from __future__ import annotations

import functools

import llguidance
import llguidance.hf
import llguidance.torch as llg_torch
import torch
from transformers import PreTrainedTokenizerBase

from tandem.structured.params import StructuredOutputs


class GrammarCache:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self.grammar = functools.lru_cache(maxsize=256)(self._grammar)

    def _grammar(self, spec: StructuredOutputs) -> str:
        """The validated grammar of `spec`; ValueError naming the field and llguidance's reason."""
        grammar = spec.to_grammar()
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"{spec.label}: {error.strip()}")
        return grammar

    def matcher(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self.grammar(spec))


def apply_masks(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> None:
    """In place: each row with a matcher keeps only the tokens its grammar allows next."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    mask = llg_torch.allocate_token_bitmask(len(rows), logits.shape[1])
    for j, i in enumerate(rows):
        llg_torch.fill_next_token_bitmask(matchers[i], mask, j)
    sub = logits[rows]
    llg_torch.apply_token_bitmask_inplace(sub, mask.to(logits.device))
    logits[rows] = sub

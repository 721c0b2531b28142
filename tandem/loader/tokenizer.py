"""Tokenizer, chat template and stop tokens of a checkpoint folder."""
from __future__ import annotations

import json
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(folder: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(folder)


def eos_token_ids(folder: str, config, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends generation: the config's, generation_config's and the tokenizer's."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    add(tokenizer.eos_token_id)
    path = os.path.join(folder, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            add(json.load(f).get("eos_token_id"))
    return frozenset(ids)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> tuple[str, list[int]]:
    """The chat template's text and ids; the template already holds any BOS token."""
    if not messages:
        raise ValueError("messages: must not be empty")
    if tokenizer.chat_template is None:
        raise ValueError("messages: this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    check_text(text, "messages")
    return text, tokenizer.encode(text, add_special_tokens=False)


def check_text(text: str, field: str) -> None:
    """Lone surrogates pass as `str` but break tokenizers and hashing: reject them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field}: is not valid Unicode text (lone surrogate)") from None

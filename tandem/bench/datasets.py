"""Prompts for `tandem bench serve`, with exact token lengths for the served model's tokenizer.

Text is built from the tokenizer's own one-token words (a space and lower-case letters that
encode to a single id): pre-tokenization splits at spaces, so n such words are n tokens, which
random token ids decoded to text are not. Seeded, so every run and every engine gets the same
prompts.
"""
from __future__ import annotations

import json
import random
import weakref
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int  # tokens, by the served model's tokenizer
    output_len: int
    group: int = -1  # shared-prefix group, -1 when none


_WORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def one_token_words(tokenizer) -> list[str]:
    """Sorted, so the seed alone decides the text. Computed once per tokenizer."""
    if tokenizer in _WORDS:
        return _WORDS[tokenizer]
    texts = {tokenizer.convert_tokens_to_string([tok]) for tok in tokenizer.get_vocab()}
    texts = sorted(t for t in texts if t.startswith(" ") and len(t) >= 4 and t[1:].isascii()
                   and t[1:].isalpha() and t[1:].islower())
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    words = [t for t, i in zip(texts, ids) if len(i) == 1]
    if len(words) < 100:
        raise ValueError("tokenizer: too few one-token words to build prompts from")
    _WORDS[tokenizer] = words
    return words


def _lengths(rng: random.Random, mean: int, range_ratio: float, n: int) -> list[int]:
    """n lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1."""
    lo, hi = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_requests(tokenizer, num: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    words = one_token_words(tokenizer)
    ins = _lengths(rng, input_len, range_ratio, num)
    outs = _lengths(rng, output_len, range_ratio, num)
    return [BenchRequest("".join(rng.choices(words, k=i)), i, o) for i, o in zip(ins, outs)]


def shared_prefix_requests(tokenizer, groups: int, prompts_per_group: int | list[int],
                           system_len: int, question_len: int, output_len: int,
                           seed: int = 0) -> list[BenchRequest]:
    """SGLang's generated-shared-prefix: each group's prompts share a system prompt of
    `system_len` tokens and add their own question; shuffled, so a group's requests do not
    arrive back to back. A list gives each group its own count (a skewed, "hot" workload)."""
    rng = random.Random(seed)
    words = one_token_words(tokenizer)
    counts = (prompts_per_group if isinstance(prompts_per_group, list)
              else [prompts_per_group] * groups)
    out = []
    for g in range(groups):
        system = "".join(rng.choices(words, k=system_len))
        out += [BenchRequest(system + "".join(rng.choices(words, k=question_len)),
                             system_len + question_len, output_len, g)
                for _ in range(counts[g])]
    rng.shuffle(out)
    return out


def file_requests(path: str, tokenizer, output_len: int, num: int | None = None
                  ) -> list[BenchRequest]:
    """JSONL, one object a line: {"prompt": str, "output_len": int (optional)}."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
                if not isinstance(prompt, str):
                    raise TypeError("prompt must be a string")
                olen = int(row.get("output_len", output_len))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"dataset-path: line {n}: {e}") from e
            out.append(BenchRequest(prompt, len(tokenizer.encode(prompt,
                                                                 add_special_tokens=False)),
                                    olen))
            if num is not None and len(out) == num:
                break
    if not out:
        raise ValueError(f"dataset-path: no prompts in {path}")
    return out

"""Engine outputs -> OpenAI response and stream-chunk bodies."""
from __future__ import annotations

from tandem.engine.outputs import CompletionOutput, Logprob


def _top(entry: dict[int, Logprob], n: int, also: int | None = None) -> list[Logprob]:
    """The n most likely tokens (plus token `also` wherever it ranks), most likely first."""
    return sorted((lp for t, lp in entry.items() if lp.rank <= n or t == also),
                  key=lambda lp: lp.rank)


def completion_logprobs(out: CompletionOutput, start: int, text_offset: int,
                        top_n: int) -> dict | None:
    """The legacy completions shape for tokens [start:], offsets counted from `text_offset`."""
    if out.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, entry in zip(out.token_ids[start:], out.logprobs[start:]):
        chosen = entry[token_id]
        tokens.append(chosen.decoded_token)
        token_lps.append(chosen.logprob)
        # OpenAI's legacy API always lists the sampled token too: up to logprobs + 1 entries.
        tops.append({lp.decoded_token: lp.logprob for lp in _top(entry, top_n, token_id)})
        offsets.append(text_offset)
        text_offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _entry(lp: Logprob) -> dict:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode())}


def chat_logprobs(out: CompletionOutput, start: int, top_n: int) -> dict | None:
    if out.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(out.token_ids[start:], out.logprobs[start:]):
        content.append({**_entry(entry[token_id]),
                        "top_logprobs": [_entry(lp) for lp in _top(entry, top_n)]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

"""Engine outputs -> OpenAI response and stream-chunk bodies."""
from __future__ import annotations

import dataclasses

from tandem.engine.outputs import CompletionOutput, Logprob, RequestOutput


def _top(entry: dict[int, Logprob], n: int, also: int | None = None) -> list[Logprob]:
    """The n most likely tokens (plus token `also` wherever it ranks), most likely first."""
    return sorted((lp for t, lp in entry.items() if lp.rank <= n or t == also),
                  key=lambda lp: lp.rank)


def completion_logprobs(out: CompletionOutput, start: int, text_offset: int, top_n: int,
                        echo: tuple[RequestOutput, str] | None = None) -> dict | None:
    """The legacy completions shape for tokens [start:], offsets counted from `text_offset`.
    `echo` (the request's output and its first prompt token as text) puts the prompt's tokens
    first, offsets from 0; nothing predicts the first, so its logprobs are null, as vLLM's."""
    if out.logprobs is None:
        return None
    body: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                             "text_offset": []}
    if echo is not None:
        prompt, first_token = echo
        _legacy(body, prompt.prompt_token_ids, prompt.prompt_logprobs, 0, top_n, first_token)
    _legacy(body, out.token_ids[start:], out.logprobs[start:], text_offset, top_n)
    return body


def _legacy(body: dict[str, list], token_ids: list[int], entries: list[dict[int, Logprob] | None],
            text_offset: int, top_n: int, first_token: str = "") -> None:
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            token, token_lp, top = first_token, None, None
        else:
            chosen = entry[token_id]
            token, token_lp = chosen.decoded_token or "", chosen.logprob
            # OpenAI's legacy API always lists the sampled token too: up to logprobs + 1 entries.
            top = {lp.decoded_token: lp.logprob for lp in _top(entry, top_n, token_id)}
        body["tokens"].append(token)
        body["token_logprobs"].append(token_lp)
        body["top_logprobs"].append(top)
        body["text_offset"].append(text_offset)
        text_offset += len(token)


def prompt_logprobs(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (null for the first), token id -> its entry."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else {str(t): dataclasses.asdict(lp) for t, lp in entry.items()}
            for entry in out.prompt_logprobs]


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

"""The state of one sequence as it moves through the scheduler."""
from __future__ import annotations

import enum
import time

import torch

from tandem.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), cache_salt: str | None = None,
                 seed: int | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.logprobs: list[dict[int, float]] = []
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic()
        self.last_token_time: float | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = -1  # prompt tokens found in the prefix cache at first admission
        self.spec_token_ids: list[int] = []  # proposed next tokens this step verifies
        # Adaptive speculation (tandem/spec/adaptive.py): this request's proposal length now,
        # steps left without proposals, and proposals in a row that were all rejected.
        self.spec_k: int | None = None
        self.spec_backoff = 0
        self.spec_misses = 0
        self.spec_accepted_w = 0.0  # decayed counts behind acceptance_rate (spec/adaptive.py)
        self.spec_rejected_w = 0.0
        # Prompt logprobs collected so far, entry p for position p (predicting prompt token
        # p + 1), as the sampler gives them; None when this request does not collect them (a
        # parent's children share one prompt: only the first does).
        self.prompt_logprobs: list[tuple[float, int, list[int], list[float]]] | None = None
        self.grammar = None  # llguidance.LLMatcher of a structured-output request
        self.kv_store_checked = False  # the shared KV store was asked for this prompt's blocks
        # A private generator makes seeded sampling independent of the rest of the batch.
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.consume_token(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """Token-level stop conditions; stop strings are the detokenizer's job."""
        n, last, p = self.num_output_tokens, self.all_token_ids[-1], self.params
        if self.grammar is not None and self.grammar.is_error():
            # The matcher gave up (e.g. a grammar past llguidance's limits): what follows would
            # not be constrained, and a "stop" would claim the structure is complete.
            self.status, self.stop_reason = RequestStatus.FINISHED_ABORTED, \
                f"structured_outputs: {self.grammar.get_error()}"
            return True
        if n >= p.min_tokens:
            if not p.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in p.stop_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
                return True
        if self.grammar is not None and self.grammar.is_stopped():  # the structure is complete
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if n >= p.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

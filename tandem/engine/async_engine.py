"""AsyncEngine: the engine steps on one dedicated thread; asyncio callers get per-request queues.

The asyncio loop never runs model code, and the model never hops threads (ARCHITECTURE.md):
requests and aborts cross over through a thread-safe queue, outputs come back through
`loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tandem.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.stats import StatsLogger

logger = logging.getLogger("tandem.engine")


class EngineDeadError(RuntimeError):
    """The step loop stopped; no request can complete."""


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    prompt_text: str | None
    cache_salt: str | None
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    reason: str


class AsyncEngine:
    def __init__(self, config: EngineConfig, log_stats_interval: float = 0.0):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        # Adds sent to / taken by the engine thread; each counter has a single writer thread.
        self._sent = self._taken = 0
        self.error: BaseException | None = None
        # The engine is built on the thread that steps it, so every torch op runs on one thread
        # with one OpenMP team. Loading on the caller's thread left a second team behind, and
        # with more OpenMP threads than cores libgomp stops spin-waiting between parallel
        # regions: a one-row CPU step took 17 ms instead of 8 (2 cores, benchmarks/decode_step.py
        # against this loop).
        built = threading.Event()
        self._thread = threading.Thread(target=self._main,
                                        args=(config, log_stats_interval, built),
                                        name="tandem-engine", daemon=True)
        self._thread.start()
        built.wait()
        if self.error is not None:
            self._thread.join()
            raise self.error
        self.tokenizer = self.engine.tokenizer

    def _main(self, config: EngineConfig, log_stats_interval: float,
              built: threading.Event) -> None:
        try:
            self.engine = LLMEngine(config)
            self._stats = (StatsLogger(self.engine, log_stats_interval)
                           if log_stats_interval else None)
        except BaseException as e:  # noqa: BLE001 - __init__ re-raises it on its own thread
            self.error = e
            return
        finally:
            built.set()
        self._run()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._sent - self._taken

    def validate(self, prompt: str | list[int], params: SamplingParams,
                 cache_salt: str | None = None) -> list[int]:
        """Everything add_request would reject, checked up front so HTTP can answer 400."""
        return self.engine.check_request(prompt, params, cache_salt)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       prompt_text: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs as they advance; leaving the iterator early aborts the request."""
        if not self.running:
            raise EngineDeadError("engine is not running")
        ids = self.validate(prompt, params, cache_salt)
        out: asyncio.Queue = asyncio.Queue()
        self._sent += 1
        self._inbox.put(_Add(request_id, ids, params,
                             prompt if isinstance(prompt, str) else prompt_text, cache_salt, out,
                             asyncio.get_running_loop()))
        if self.error is not None:
            # The loop died between the `running` check and the put; its final sweep of the
            # inbox may have run before the put, so nothing would ever answer this queue.
            raise EngineDeadError(f"engine step failed: {self.error!r}")
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def abort_all(self, reason: str) -> None:
        """End every request now; each caller's iterator raises EngineDeadError(reason)."""
        self._inbox.put(_AbortAll(reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        self.engine.shutdown()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                # Block only when idle; while busy, pick up new work between steps.
                block = not engine.has_unfinished_requests()
                self._drain(block)
                engine.check_health()
                if self._stop.is_set():
                    break
                for out in engine.step():
                    self._send(out.request_id, out)
                    if out.finished:
                        self._queues.pop(out.request_id, None)
                if self._stats is not None:
                    self._stats.maybe_log()
        except BaseException as e:  # any failure ends every request with an error
            logger.exception("engine step loop failed; every request ends with an error")
            self.error = e
            dead = EngineDeadError(f"engine step failed: {e!r}")
            for rid in list(self._queues):
                self._send(rid, dead)
            self._queues.clear()
            # Adds still queued would otherwise wait forever for an engine that is gone (one put
            # after this sweep sees `error` set, in generate).
            while True:
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Add):
                    _post(cmd.out, cmd.loop, dead)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if cmd is None:
                return
            if isinstance(cmd, _Add):
                self._taken += 1
            if isinstance(cmd, _Abort):
                self._queues.pop(cmd.request_id, None)
                self.engine.abort_request(cmd.request_id)
                continue
            if isinstance(cmd, _AbortAll):
                for rid in list(self._queues):
                    self.engine.abort_request(rid)
                    self._send(rid, EngineDeadError(cmd.reason))
                self._queues.clear()
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params,
                                        cmd.cache_salt, cmd.prompt_text)
            except ValueError as e:
                _post(cmd.out, cmd.loop, e)
                continue
            self._queues[cmd.request_id] = (cmd.out, cmd.loop)

    def _send(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None and not _post(*target, item):
            # Its caller's event loop is closed: nobody will read this or send the abort, and
            # one caller going away must not end the step loop.
            self._queues.pop(request_id, None)
            self.engine.abort_request(request_id)


def _post(q: asyncio.Queue, loop: asyncio.AbstractEventLoop, item) -> bool:
    """Hand `item` to an asyncio queue from the engine thread; False if its loop is closed."""
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
    except RuntimeError:
        return False
    return True

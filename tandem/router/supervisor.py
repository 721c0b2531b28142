"""`serve -dp` keeps its replicas running: a replica that dies is reaped, the log says why, and
it starts again on the same port, so the router's entry for that URL comes back up through its
usual /ready probes. Restarts back off, and stop after too many in a minute: a replica that
cannot start (a bad flag, a lost device) must not reload the model in a loop forever."""
from __future__ import annotations

import logging
import math
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger("tandem.router")

FIRST_DELAY_S, MAX_DELAY_S = 1.0, 30.0  # doubling from the first to the cap
MAX_RESTARTS, WINDOW_S = 5, 60.0  # more restarts than this in the window: it stays down
STABLE_AFTER_S = 60.0  # a replica up this long starts the next backoff from the first delay
POLL_S = 0.5


class Backoff:
    """The restart policy for one replica."""

    def __init__(self) -> None:
        self.delay = FIRST_DELAY_S
        self.restarts: deque[float] = deque()  # when each recent restart was decided

    def next_delay(self, died_at: float, up_for: float) -> float | None:
        """Seconds to wait before restarting a replica that died at `died_at` (monotonic) after
        running `up_for` seconds; None once MAX_RESTARTS were decided in the last WINDOW_S."""
        if up_for >= STABLE_AFTER_S:
            self.delay = FIRST_DELAY_S
        while self.restarts and died_at - self.restarts[0] >= WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            return None
        self.restarts.append(died_at)
        delay, self.delay = self.delay, min(2 * self.delay, MAX_DELAY_S)
        return delay


def exit_reason(returncode: int) -> str:
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-returncode}"


class Supervisor:
    """Starts one replica per command; from `watch()` on, a thread restarts the ones that die,
    until `stop()` or while `draining()` (a replica exiting during shutdown stays down)."""

    def __init__(self, commands: list[list[str]], urls: list[str],
                 env: dict[str, str] | None = None):
        self.commands, self.urls, self.env = commands, urls, env
        self.procs = [subprocess.Popen(c, env=env) for c in commands]
        self.started = [time.monotonic()] * len(commands)
        self.backoffs = [Backoff() for _ in commands]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, draining: Callable[[], bool]) -> None:
        # A thread, not a task on the router's loop: polling and Popen never block serving.
        self._thread = threading.Thread(target=self._run, args=(draining,),
                                        name="replica-supervisor", daemon=True)
        self._thread.start()

    def _run(self, draining: Callable[[], bool]) -> None:
        due: dict[int, float] = {}  # replica -> when to restart it (inf: it stays down)
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            for i, proc in enumerate(self.procs):
                if i in due:
                    if now >= due[i] and not draining():
                        del due[i]
                        self.procs[i] = subprocess.Popen(self.commands[i], env=self.env)
                        self.started[i] = now
                        logger.info("replica %s restarted (pid %d)", self.urls[i],
                                    self.procs[i].pid)
                    continue
                if proc.poll() is None:  # poll() also reaps a dead one: no zombie
                    continue
                due[i] = self._died(i, now, draining())

    def _died(self, i: int, now: float, draining: bool) -> float:
        """Log why replica `i` died; when to restart it."""
        proc = self.procs[i]
        why = f"replica {self.urls[i]} (pid {proc.pid}) died: {exit_reason(proc.returncode)}"
        if draining:
            logger.warning("%s, during shutdown", why)
            return math.inf
        delay = self.backoffs[i].next_delay(now, now - self.started[i])
        if delay is None:
            logger.error("%s; %d restarts in %.0fs, it stays down", why, MAX_RESTARTS, WINDOW_S)
            return math.inf
        logger.warning("%s; restarting in %.0fs", why, delay)
        return now + delay

    def stop(self, timeout: float) -> None:
        """No more restarts; SIGTERM every replica, SIGKILL those still running after
        `timeout` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # after this no restart can slip in: every proc is final
        for p in self.procs:
            p.terminate()  # a no-op for one already reaped
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

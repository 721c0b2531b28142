"""`serve -dp`'s replica supervisor without a model: the backoff policy as plain arithmetic,
and the restart loop on real short-lived processes (`sh -c 'exit 3'`) with its delays shrunk.
tests/server/test_data_parallel.py SIGKILLs a real replica."""
from __future__ import annotations

import logging
import os
import time

import pytest

from tandem.router import supervisor
from tandem.router.data_parallel import replica_env
from tandem.router.supervisor import Backoff, Supervisor, exit_reason


def test_backoff_doubles_to_its_cap_then_gives_up_within_the_window():
    b, t = Backoff(), 0.0
    delays = []
    for _ in range(supervisor.MAX_RESTARTS):
        delays.append(b.next_delay(t, up_for=1.0))
        t += delays[-1] + 1.0  # restarted after the delay, died a second later
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert t < supervisor.WINDOW_S and b.next_delay(t, up_for=1.0) is None  # stays down
    assert b.next_delay(supervisor.WINDOW_S + 1.0, up_for=1.0) == 30.0  # the oldest aged out: capped


def test_backoff_starts_over_after_a_replica_stayed_up():
    b = Backoff()
    assert [b.next_delay(t, up_for=1.0) for t in (0.0, 2.0, 5.0)] == [1.0, 2.0, 4.0]
    assert b.next_delay(100.0, up_for=supervisor.STABLE_AFTER_S) == 1.0


def test_exit_reasons_name_the_signal():
    assert exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(3) == "exit code 3"
    assert exit_reason(-40) == "killed by signal 40"


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(supervisor, "POLL_S", 0.01)
    monkeypatch.setattr(supervisor, "FIRST_DELAY_S", 0.01)
    monkeypatch.setattr(supervisor, "MAX_DELAY_S", 0.05)


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_crash_looping_replica_is_restarted_then_stays_down(fast, caplog):
    caplog.set_level(logging.INFO, "tandem.router")
    sup = Supervisor([["sh", "-c", "exit 3"]], ["http://127.0.0.1:1"])
    sup.watch(lambda: False)
    try:
        wait_for(lambda: "stays down" in caplog.text)
        assert caplog.text.count("restarted (pid") == supervisor.MAX_RESTARTS
        assert caplog.text.count("died: exit code 3") == supervisor.MAX_RESTARTS + 1
        assert sup.procs[0].returncode == 3  # reaped: no zombie left behind
        time.sleep(0.1)
        assert caplog.text.count("restarted (pid") == supervisor.MAX_RESTARTS
    finally:
        sup.stop(5)
    assert not os.path.exists(f"/proc/{sup.procs[0].pid}")


def test_no_restart_while_draining_and_stop_ends_every_replica(fast, caplog):
    caplog.set_level(logging.INFO, "tandem.router")
    draining = [False]
    sup = Supervisor([["sleep", "30"], ["sleep", "30"]], ["http://a", "http://b"])
    sup.watch(lambda: draining[0])
    try:
        first = sup.procs[0]
        first.kill()
        wait_for(lambda: sup.procs[0] is not first)  # restarted
        draining[0] = True
        sup.procs[1].kill()
        wait_for(lambda: "during shutdown" in caplog.text)
        time.sleep(0.1)
        assert "http://b restarted" not in caplog.text
        assert "killed by SIGKILL; restarting" in caplog.text
    finally:
        sup.stop(5)
    assert all(p.returncode is not None for p in sup.procs)


def test_replicas_split_the_cores_unless_omp_num_threads_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert replica_env(3)["OMP_NUM_THREADS"] == "2"
    assert replica_env(16)["OMP_NUM_THREADS"] == "1"
    out = tmp_path / "threads"
    sup = Supervisor([["sh", "-c", f'echo "$OMP_NUM_THREADS" > {out}']], ["http://a"],
                     replica_env(4))
    assert sup.procs[0].wait(timeout=10) == 0
    assert out.read_text().strip() == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert replica_env(2)["OMP_NUM_THREADS"] == "5"

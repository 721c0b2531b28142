"""The tensor-parallel process group as rank 0 sees it: worker processes, the step broadcast,
keep-alives, and fault detection.

Rank 0 is the engine process. It spawns the other local ranks as `python -m
tandem.distributed.worker` processes (configuration as JSON on the command line, never pickle).
On other nodes, `tandem serve --node-rank R` starts that node's ranks. Every collective has a
timeout. Collectives are issued only under `lock`, so step broadcasts and keep-alives never
interleave. A keep-alive thread pings the workers while the engine is idle, which is also how
a dead worker is noticed between requests. Gloo reports a dead peer at once ("connection closed
by peer"), and the thread also polls the local worker processes, which covers NCCL.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from tandem.config import EngineConfig
from tandem.distributed import step
from tandem.procs import free_port

logger = logging.getLogger("tandem.distributed")
KEEPALIVE_S = 1.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank is gone: no step can complete any more."""


def collective_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("TANDEM_DIST_TIMEOUT", "60")))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(config: EngineConfig, local_rank: int) -> torch.device:
    device = config.torch_device
    if device.type == "cuda" and config.tensor_parallel_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_process_group(config: EngineConfig, rank: int, device: torch.device) -> None:
    dist.init_process_group(backend_for(device), rank=rank,
                            world_size=config.tensor_parallel_size, timeout=collective_timeout(),
                            init_method=f"tcp://{config.master_addr}:{config.master_port}")


def spawn_local_workers(config: EngineConfig, first_rank: int, count: int) -> list[subprocess.Popen]:
    """Start ranks first_rank .. first_rank + count - 1 on this host."""
    blob = json.dumps(dataclasses.asdict(config))
    procs = []
    for i in range(count):
        rank = first_rank + i
        local_rank = rank % config.ranks_per_node
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tandem.distributed.worker", "--rank", str(rank),
             "--local-rank", str(local_rank), "--config", blob],
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}))
    return procs


class TPGroup:
    """Size 1: every method is a cheap no-op. Size N: rank 0's side of the group."""

    def __init__(self, config: EngineConfig | None = None):
        self.lock = threading.RLock()
        self.size = config.tensor_parallel_size if config else 1
        self.workers: list[subprocess.Popen] = []
        self.error: BaseException | None = None
        self.device = torch.device("cpu")
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tier_ops: list[list] = []  # run on rank 0, not yet sent (kv_store/tiers.py)

    def start(self, config: EngineConfig) -> torch.device:
        """Spawn this node's other ranks and join the group as rank 0."""
        if config.master_port is None:
            config.master_port = free_port(config.master_addr)
        self.device = local_device(config, 0)
        self.workers = spawn_local_workers(config, 1, config.ranks_per_node - 1)
        atexit.register(self.shutdown)
        try:
            init_process_group(config, 0, self.device)
        except BaseException:
            self.shutdown()
            raise
        return self.device

    def start_keepalive(self) -> None:
        if self.size > 1:
            self._thread = threading.Thread(target=self._keepalive, name="tandem-tp-keepalive",
                                            daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def step(self, inputs: step.StepInputs) -> Iterator[None]:
        """Broadcast a step, then run it (the body) on this rank too, holding the lock so no
        keep-alive slips in between the collectives. Any failure ends the group."""
        if self.size == 1:
            yield
            return
        with self._collective():
            self._send_tier_ops()
            step.send(step.STEP, inputs, self.device)
            yield

    def record_tier_op(self, op: list) -> None:
        """A KV tier operation rank 0 just ran, for the workers to repeat before the next
        step (or flush)."""
        if self.size > 1:
            self.tier_ops.append(op)

    def flush_tier_ops(self) -> None:
        if self.size > 1 and self.tier_ops:
            with self._collective():
                self._send_tier_ops()

    def loaded_min(self, load_id: int, wait_s: float, count: int) -> int:
        """How many blocks of store load `load_id` every rank holds: this rank has `count`;
        the workers wait up to `wait_s` for theirs."""
        if self.size == 1:
            return count
        with self._collective():
            self._send_tier_ops()
            step.send(step.LOADED, None, self.device, (load_id, int(wait_s * 1000)))
            return self.all_reduce_min(count)

    def _send_tier_ops(self) -> None:
        if self.tier_ops:
            ops, self.tier_ops = self.tier_ops, []
            step.send_tier_ops(ops, self.device)

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        with self.lock:
            self._check()
            try:
                yield
            except Exception as e:  # noqa: BLE001 - a rank is gone or a collective timed out
                self._fail(e)
            self._last = time.monotonic()

    def all_reduce_min(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _check(self) -> None:
        if self.error is not None:
            raise WorkerDiedError(str(self.error))
        for i, p in enumerate(self.workers):
            if p.poll() is not None:
                self._fail(WorkerDiedError(f"tensor-parallel rank {i + 1} (pid {p.pid}) exited "
                                           f"with status {p.returncode}"))

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e if isinstance(e, WorkerDiedError) else WorkerDiedError(
                f"a tensor-parallel collective failed: {e}")
            logger.error("%s", self.error)
        raise self.error

    def _keepalive(self) -> None:
        while not self._stop.wait(KEEPALIVE_S / 4):
            if time.monotonic() - self._last < KEEPALIVE_S:
                continue
            with self.lock:
                if self._stop.is_set():
                    return
                try:
                    self._check()
                    step.send(step.KEEPALIVE, None, self.device)
                    self._last = time.monotonic()
                except Exception as e:  # noqa: BLE001 - recorded in self.error for the engine
                    if self.error is None:
                        self.error = WorkerDiedError(f"tensor-parallel group failed: {e}")
                        logger.error("%s", self.error)
                    return

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self.size > 1 and self.error is None and dist.is_initialized():
            with self.lock:
                try:
                    step.send(step.STOP, None, self.device)
                except Exception as e:  # noqa: BLE001 - the workers are gone already
                    logger.info("stop not delivered: %s", e)
        if self.error is not None:
            # The group is broken: survivors wait on collectives that will never complete.
            timeout = 0
        deadline = time.monotonic() + timeout
        for p in self.workers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.size > 1 and self.error is None and dist.is_initialized():
            dist.destroy_process_group()

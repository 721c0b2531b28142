"""`tandem serve -dp 2` as a real process for the data-parallel and chaos tests: start it,
find its replica children, stop it (and them, by PID, if it hangs)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from server_utils import MODEL_NAME, free_port


def serve_dp2(model_dir: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`serve -dp 2` on a free port, all output (the replicas' too) into `log`."""
    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--model",
                                 model_dir, "--served-model-name", MODEL_NAME,
                                 "--kv-cache-memory", "96MiB", "-dp", "2", "--port", str(port),
                                 "--shutdown-timeout", "5"],
                                stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc, f"http://127.0.0.1:{port}"


def children_of(pid: int) -> set[int]:
    return {int(c) for t in os.listdir(f"/proc/{pid}/task")
            for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()}


def replica_url(pid: int) -> str:
    """The URL of the replica running as `pid`, from its --port."""
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"


def stop_dp(proc: subprocess.Popen, children: set[int]) -> int:
    """SIGTERM `serve -dp`: its exit code. If it hangs, SIGKILL it and its replicas by PID."""
    children = children | (children_of(proc.pid) if proc.poll() is None else set())
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        for pid in (proc.pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise

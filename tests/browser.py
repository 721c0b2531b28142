"""Headless Chromium from the distribution's package, for tests that check what a real browser
renders. Missing, it is a skip with the reason, or a failure under TANDEM_REQUIRE_SERVICES=1
(CI sets it; .ci/run installs the package)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from redis_service import need


def chromium() -> str:
    return need("chromium", "chromium")


def _run(url: str, profile: Path, *flags: str, budget_ms: int) -> str:
    # --virtual-time-budget runs the page's timers and fetches before the dump or screenshot.
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *flags, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def rendered_dom(url: str, profile: Path, budget_ms: int = 3000) -> str:
    """The page's DOM after its scripts ran, as Chromium serializes it."""
    return _run(url, profile, "--dump-dom", budget_ms=budget_ms)


def screenshot(url: str, profile: Path, path: Path, size: str = "1200,760",
               budget_ms: int = 3000) -> None:
    _run(url, profile, f"--screenshot={path}", f"--window-size={size}",
         "--hide-scrollbars", budget_ms=budget_ms)
    assert path.stat().st_size > 0

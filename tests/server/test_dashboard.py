"""The status page in a real browser: headless Chromium renders /dashboard of `serve -dp 2`
(the router's view: both replicas by URL, with their state) and of a replica (its engine);
after a SIGKILL the page shows that replica down within the router's probe rounds. The data
endpoint needs the API key unless --dashboard-public."""
from __future__ import annotations

import os
import re
import shutil
import signal
import time

import httpx
import pytest
from browser import chromium, rendered_dom, screenshot
from dp_utils import children_of, replica_url, serve_dp2, stop_dp
from server_utils import MODEL_NAME, wait_until_ready

from tandem.router.replicas import ProbeConfig

_ROW = re.compile(r'<tr class="replica[^"]*" data-url="([^"]+)" data-state="([^"]+)"')


def replica_states(dom: str) -> dict[str, str]:
    return dict(_ROW.findall(dom))


def test_router_page_lists_replicas_and_shows_one_killed(smollm2_dir, tmp_path):
    chromium()  # a skip (or a CI failure) before a minute of start-up, not after
    proc, url = serve_dp2(smollm2_dir, tmp_path / "serve.log")
    children: set[int] = set()
    try:
        assert wait_until_ready(url, proc, timeout=180)
        for _ in range(3):  # samples for the charts
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8})
            assert r.status_code == 200, r.text
        children = children_of(proc.pid)
        urls = {replica_url(pid): pid for pid in children}
        page = f"{url}/dashboard/"
        time.sleep(6)  # a second chart sample (every 5 s)
        dom = rendered_dom(page, tmp_path / "profile")
        assert replica_states(dom) == dict.fromkeys(urls, "up"), dom[-3000:]
        assert 'data-kind="router"' in dom and "2 / 2" in dom  # replicas up
        shot = tmp_path / "dashboard.png"
        screenshot(page, tmp_path / "profile", shot)
        if os.environ.get("TANDEM_DASHBOARD_SCREENSHOT"):  # README's picture comes from here
            shutil.copy(shot, os.environ["TANDEM_DASHBOARD_SCREENSHOT"])
        print(f"screenshot: {shot}")

        victim_url, victim = min(urls.items())
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        # The probes mark it down after `unhealthy_after` failed rounds; the page polls every
        # 2 s. Chromium's own start-up is the rest of the margin.
        probe = ProbeConfig()
        deadline = killed + probe.interval * (probe.unhealthy_after + 1) + 15
        while True:
            states = replica_states(rendered_dom(page, tmp_path / "profile"))
            if states.get(victim_url) == "down":
                break
            assert time.monotonic() < deadline, states
        assert states[next(u for u in urls if u != victim_url)] == "up"
        print(f"shown down {time.monotonic() - killed:.1f} s after the SIGKILL")
    finally:
        stop_dp(proc, children | (children_of(proc.pid) if proc.poll() is None else set()))


def test_replica_page_shows_its_engine(server, tmp_path):
    dom = rendered_dom(f"{server.url}/dashboard/", tmp_path / "profile")
    assert 'data-kind="replica"' in dom and 'data-loaded="1"' in dom, dom[-3000:]
    for label in ("model", "dtype", "quantization", "KV capacity", "running", "waiting"):
        assert f'<div class="label">{label}</div>' in dom
    assert f'<div class="value">{MODEL_NAME}</div>' in dom


def test_dashboard_files_and_redirect(http):
    r = http.get("/dashboard")
    assert r.status_code == 307 and r.headers["location"].endswith("/dashboard/")
    for path, kind in (("/dashboard/", "text/html"), ("/dashboard/dashboard.js", "javascript"),
                       ("/dashboard/dashboard.css", "text/css")):
        r = http.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    data = http.get("/dashboard/data").json()
    assert data["kind"] == "replica" and data["model"] == MODEL_NAME
    assert set(data["series"]) == {"t", "request_rate", "token_rate", "ttft_ms", "itl_ms"}


@pytest.fixture(scope="module")
def keyed(smollm2_dir):
    from server_utils import start_server
    with start_server(smollm2_dir, "--api-key", "k1") as s:
        yield s


def test_data_needs_the_key_unless_public(keyed):
    assert httpx.get(f"{keyed.url}/dashboard/").status_code == 200  # no data in the files
    r = httpx.get(f"{keyed.url}/dashboard/data")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{keyed.url}/dashboard/data", headers={"Authorization": "Bearer k1"})
    assert r.status_code == 200 and r.json()["kind"] == "replica"

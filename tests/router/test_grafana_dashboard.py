"""deploy/grafana/tandem.json against live /metrics: every series a panel queries is served by a
real `tandem serve` replica (tandem:*) or by a real `tandem route` in front of it
(tandem_router:*), with the type and labels the query assumes; the JSON has a dashboard's shape;
deploy/prometheus/prometheus.yml parses and scrapes both."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tandem.procs import free_port, stop_process, wait_until_ready

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))
from server_utils import MODEL_NAME, start_server  # tests/server, on sys.path above

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = r"\btandem(?:_router)?:[A-Za-z_][A-Za-z0-9_]*"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# The replica runs every optional metric family: both KV tiers (a file:// store needs no
# service) and n-gram speculative decoding.
REPLICA_FLAGS = ("--kv-host-memory", "16MiB",
                 "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}')
# Which /metrics each dashboard row reads; the glance row at the top mixes both.
ROW_SOURCES = {"Router": {"router"}, "Replicas": {"replica"}, "KV tiers": {"replica"},
               "Speculative decoding": {"replica"}}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "tandem.json").read_text())


def all_panels(panels: list[dict], row: str = "") -> list[tuple[str, dict]]:
    """(the title of the row above it, panel) for every panel, also inside collapsed rows."""
    out = []
    for p in panels:
        if p["type"] == "row":
            row = p["title"]
        out.append((row, p))
        out += all_panels(p.get("panels", []), row)
    return out


def targets() -> list[tuple[str, str, dict]]:
    return [(row, p["title"], t) for row, p in all_panels(dashboard()["panels"])
            for t in p.get("targets", [])]


class Exposition:
    """One /metrics text: each series name with its type and label names."""

    def __init__(self, text: str):
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
        self.labels: dict[str, set[str]] = {}
        self.kind: dict[str, str] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, labels = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?", line).groups()
            self.labels.setdefault(name, set()).update(
                re.findall(r'([A-Za-z_]\w*)="(?:[^"\\]|\\.)*"', labels or ""))
            family = next((name.removesuffix(s) for s in HISTOGRAM_SERIES if name.endswith(s)
                           and types.get(name.removesuffix(s)) == "histogram"), name)
            self.kind[name] = types[family]


@pytest.fixture(scope="module")
def live(smollm2_dir, tmp_path_factory) -> dict[str, Exposition]:
    """A replica and a router in front of it, after one completion through the router; their
    /metrics once every series the dashboard queries is there (the router learns a replica's
    hit rate from its probes), or after 15 s. Both processes are stopped by then."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("router") / "route.log"
    # The router starts first, so that its start-up overlaps the model load: on a placeholder
    # URL where nothing listens, swapped for the replica through /workers once it is up.
    placeholder = f"http://127.0.0.1:{free_port()}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "route", "--worker-urls",
                                 placeholder, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        store = tmp_path_factory.mktemp("kv-store")
        with start_server(smollm2_dir, *REPLICA_FLAGS, "--kv-store", f"file://{store}") as replica:
            assert wait_until_ready(url, proc, timeout=60, probe=lambda u: httpx.get(
                f"{u}/health", timeout=2).status_code == 200), log.read_text()[-3000:]
            assert httpx.post(f"{url}/workers", json={"url": replica.url}).status_code == 201
            (old,) = [w["id"] for w in httpx.get(f"{url}/workers").json()["workers"]
                      if w["url"] == placeholder]
            assert httpx.delete(f"{url}/workers/{old}").status_code == 200
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": MODEL_NAME, "prompt": "one two three one two three", "max_tokens": 3,
                "temperature": 0})
            assert r.status_code == 200, r.text
            wanted = {m for _, _, t in targets() for m in re.findall(METRIC, t["expr"])}
            deadline = time.monotonic() + 15
            while True:
                got = {name: Exposition(httpx.get(f"{base}/metrics", timeout=10).text)
                       for name, base in (("replica", replica.url), ("router", url))}
                if (wanted <= got["replica"].kind.keys() | got["router"].kind.keys()
                        or time.monotonic() > deadline):
                    return got
                time.sleep(0.2)
    finally:
        stop_process(proc, 30)


def test_every_metric_the_dashboard_queries_is_served(live):
    served = {m: source for source, exp in live.items() for m in exp.kind}
    for row, title, t in targets():
        expr = t["expr"]
        names = set(re.findall(METRIC, expr))
        where = f"{title!r} {t['refId']}: {expr}"
        assert names, where
        missing = sorted(names - served.keys())
        assert not missing, f"{where}\nnot in any live /metrics: {missing}"
        sources = {served[m] for m in names}
        assert len(sources) == 1, f"{where}\nmixes replica and router series"
        section = next((s for prefix, s in ROW_SOURCES.items() if row.startswith(prefix)), None)
        assert section is None or sources == section, f"{where}\nin row {row!r}: {sources}"
        exp = live[sources.pop()]
        # rate() over counters (and a histogram's series) only; gauges read as they are.
        rated = set(re.findall(rf"\brate\(({METRIC})", expr))
        for m in names:
            kind = exp.kind[m]
            assert (m in rated) == (kind in ("counter", "histogram")), f"{where}\n{m}: {kind}"
        # Labels grouped by, matched on or shown in the legend exist on the series queried;
        # Prometheus adds job and instance.
        known = set().union(*(exp.labels[m] for m in names)) | {"job", "instance"}
        used = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr)
                for label in group.split(",")}
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"]))
        assert used <= known, f"{where}\nlabels not on {sorted(names)}: {used - known}"


def test_dashboard_has_a_grafana_shape():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert re.fullmatch(rf"label_values\(\{{.*\}}, {name}\)", variables[name]["query"])
        assert set(re.findall(METRIC, variables[name]["query"])) == {
            "tandem:num_requests_running", "tandem_router:inflight_requests"}
    panels = [p for _, p in all_panels(d["panels"])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for p in panels:
        box = p["gridPos"]
        assert {"h", "w", "x", "y"} <= box.keys() and box["x"] + box["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            expr = t["expr"]
            # Every selector follows the job and instance variables; every rate window is
            # Grafana's, which stays at least four scrape intervals long.
            for m in re.finditer(rf"({METRIC})(\{{[^}}]*\}})?", expr):
                assert m.group(2) and 'job=~"$job"' in m.group(2), (p["title"], expr)
                assert 'instance=~"$instance"' in m.group(2), (p["title"], expr)
            assert re.findall(r"\[([^\]]*)\]", expr) == ["$__rate_interval"] * expr.count(
                "rate("), (p["title"], expr)
            for q in re.findall(r"histogram_quantile\(([^,]*), sum by \(([^)]*)\)", expr):
                assert "le" in [label.strip() for label in q[1].split(",")], expr


def test_prometheus_config_scrapes_replicas_and_router():
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    jobs = {j["job_name"]: j for j in yaml.safe_load(text)["scrape_configs"]}
    assert set(jobs) == {"tandem-replicas", "tandem-router"}
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in static["targets"])
    # The commented Kubernetes example is valid YAML once uncommented.
    lines = text.splitlines()
    start = lines.index("  # - job_name: tandem-pods")
    example = "\n".join(line.replace("# ", "", 1) for line in lines[start:]
                        if line.startswith("  # "))
    (pods,) = yaml.safe_load("scrape_configs:\n" + example)["scrape_configs"]
    assert pods["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {r["source_labels"][0]: r["regex"] for r in pods["relabel_configs"]
            if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_label_app"] == "tandem"

"""deploy/kubernetes, offline: every manifest, and every kustomization as kustomize would
render it, passes kubernetes-validate (strict) against a pinned Kubernetes version; every
container that runs Tandem has a command line Tandem's own parser and config accept; and the
names, ports and timeouts that tie the pieces together agree."""
import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tandem.cli import build_parser
from tandem.config import EngineConfig
from tandem.router.discovery import discovery_from_args

K8S_VERSION = "1.30"  # pod-index label (>= 1.28) and the preStop sleep action (>= 1.30)
ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in ROOT.rglob("kustomization.yaml"))
NOT_TANDEM = {"redis"}  # the other containers, by name


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def json6902(doc: dict, ops: list[dict]) -> None:
    """The patch operations the kustomizations use: add and replace, on JSON pointers."""
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            i = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(i, op["value"])
            else:
                assert op["op"] == "replace" and i < len(node), op
                node[i] = op["value"]
        else:
            assert op["op"] == "add" or (op["op"] == "replace" and last in node), op
            node[last] = op["value"]


def render(folder: Path) -> list[dict]:
    """What `kustomize build folder` gives for the fields used here (resources: files and
    folders; patches: inline JSON 6902 by kind and name); any other field fails the test."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(k) <= {"resources", "patches"}, f"{folder}: teach render() {set(k)}"
    docs = []
    for entry in k.get("resources", []):
        path = folder / entry
        docs += render(path) if path.is_dir() else copy.deepcopy(load(path))
    for patch in k.get("patches", []):
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, target
        hits = [d for d in docs if d["kind"] == target["kind"]
                and d["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, f"{folder}: patch target {target} matches {len(hits)}"
        json6902(hits[0], yaml.safe_load(patch["patch"]))
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{folder}: a resource twice: {keys}"
    return docs


def test_kustomizations_use_every_manifest():
    assert {p.name for p in KUSTOMIZATIONS} >= {"replicas", "kv-store", "tensor-parallel"}
    used = {(folder / e).resolve() for folder in KUSTOMIZATIONS
            for e in yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]}
    files = {p.resolve() for p in ROOT.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files <= used, f"in no kustomization: {sorted(map(str, files - used))}"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_validates(path):
    if path.name == "kustomization.yaml":
        docs = render(path.parent)
    else:
        docs = load(path)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def pods(docs: list[dict]):
    """(workload, its pod ordinals, container) for every container of every workload."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            ordinals = range(d["spec"]["replicas"]) if d["kind"] == "StatefulSet" else [None]
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, ordinals, c


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args (a name it lacks stays as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def tandem_argvs(docs: list[dict]):
    """(workload, container, args) for each Tandem container and pod: the argv after `tandem`,
    with env expanded, the pod index as POD_INDEX, as the parser reads it."""
    for d, ordinals, c in pods(docs):
        if c["name"] in NOT_TANDEM:
            continue
        assert c["command"][0] == "tandem", f"{c['name']}: run tandem itself, no shell"
        for ordinal in ordinals:
            env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                if ref == "metadata.labels['apps.kubernetes.io/pod-index']":
                    env[e["name"]] = str(ordinal)
                else:
                    assert "value" in e, f"{c['name']}: env {e['name']} the test cannot expand"
            argv = [expand(a, env) for a in [*c["command"][1:], *c.get("args", [])]]
            yield d, c, build_parser().parse_args(argv)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_every_command_line_parses_and_makes_a_valid_config(folder):
    docs = render(folder)
    seen = 0
    for _, _, args in tandem_argvs(docs):  # argparse exits (SystemExit) on a flag it lacks
        seen += 1
        if args.command == "serve":
            EngineConfig.from_args(args)  # ValueError on e.g. a node rank out of range
        else:
            assert args.command == "route"
            discovery_from_args(args)
    assert seen or folder.name == "models"


def by_name(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"no {kind} {name}"
    return hits[0]


def selects(service: dict, workload: dict) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    sel = {k: v for k, v in service["spec"]["selector"].items()
           if k != "apps.kubernetes.io/pod-index"}  # set by Kubernetes on StatefulSet pods
    return sel.items() <= labels.items()


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_names_ports_and_timeouts_agree(folder):
    docs = render(folder)
    serving = {}  # Service name -> the port Tandem listens on behind it
    for d, c, args in tandem_argvs(docs):
        spec = d["spec"]["template"]["spec"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert args.host == "0.0.0.0" and ports["http"] == args.port
        # SIGTERM's drain fits in the grace period, after the preStop pause.
        pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert spec["terminationGracePeriodSeconds"] >= pause + args.shutdown_timeout + 5
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            got = c[probe]
            assert (got["httpGet"]["path"] == path if "httpGet" in got
                    else f":{args.port}{path}'" in got["exec"]["command"][-1]), (probe, got)
        if args.command == "serve":
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert args.model.startswith("/models/") and mounts["/models"]["readOnly"]
            assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]
            for s in docs:
                if s["kind"] == "Service" and selects(s, d):
                    serving[s["metadata"]["name"]] = args.port
        if args.command == "serve" and args.nnodes > 1:
            assert d["kind"] == "StatefulSet" and d["spec"]["replicas"] == args.nnodes
            assert d["spec"]["podManagementPolicy"] == "Parallel"
            pod0, service = args.master_addr.split(".")
            assert pod0 == f"{d['metadata']['name']}-0" and service == d["spec"]["serviceName"]
            headless = by_name(docs, "Service", service)["spec"]
            assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"]
            assert args.master_port in [p["port"] for p in headless["ports"]]
        if args.kv_store if args.command == "serve" else False:
            host, port = re.fullmatch(r"redis://([^:/]+):(\d+)", args.kv_store).groups()
            assert int(port) in [p["port"] for p in by_name(docs, "Service", host)["spec"]["ports"]]
    for d, c, args in tandem_argvs(docs):
        if args.command == "route" and args.worker_dns:
            name, port = args.worker_dns
            headless = by_name(docs, "Service", name)
            assert headless["spec"]["clusterIP"] == "None" and serving[name] == port

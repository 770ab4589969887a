"""The overlays rendered by the real kustomize (``kubectl kustomize``), and what the tests read
from the objects: pod templates, containers, their environment as the kubelet expands it."""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "vllm")
#: the Kubernetes version the objects are validated against (kubectl 1.32's)
K8S_VERSION = "1.32.0"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (with its built-in kustomize) is needed"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def objects(overlay: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in render(overlay) if kind is None or o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: {len(found)} {kind} named {name}"
    return found[0]


def by_name_prefix(overlay: str, kind: str, name: str) -> dict[str, Any]:
    """A generated object (kustomize appends a hash to ConfigMap names)."""
    found = [o for o in objects(overlay, kind) if re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?",
                                                                 o["metadata"]["name"])]
    assert len(found) == 1, f"{overlay}: {len(found)} {kind} named {name}[-hash]"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [o for o in render(overlay) if o["kind"] in WORKLOADS]


def containers(spec: dict[str, Any], init: bool = True) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", []) if init else ()
    yield from spec["containers"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(workload)
    found = [c for c in containers(spec) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name}"
    return found[0]


def expand(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: a defined variable is replaced, an undefined reference
    stays as written, $$ is a literal $."""
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def environment(overlay: str, c: dict[str, Any], secrets: Mapping[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order,
    each value expanded with what is defined before it. ConfigMaps come from the render,
    Secrets from ``secrets`` ((name, key) -> value: the operator's, which no render holds)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert "configMapRef" in source, f"{c['name']}: envFrom only from ConfigMaps here"
        env.update(one(overlay, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            env[var["name"]] = secrets[(ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])]
        elif "configMapKeyRef" in ref:
            env[var["name"]] = one(overlay, "ConfigMap", ref["configMapKeyRef"]["name"])["data"][
                ref["configMapKeyRef"]["key"]]
        else:
            raise AssertionError(f"{c['name']}: unexpected valueFrom {ref}")
    return env


def quantity(q: str | float) -> float:
    """A Kubernetes resource quantity as a number (bytes, cores)."""
    text = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def labels_match(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        have = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and have not in e["values"] or op == "NotIn" and have in e["values"]:
            return False
        if op == "Exists" and e["key"] not in labels or op == "DoesNotExist" and e["key"] in labels:
            return False
    return True

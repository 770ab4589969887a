"""Writes prometheusrule.yaml: the groups of rules.yaml (the one source) wrapped as the
Prometheus operator's PrometheusRule. Run after editing rules.yaml; tests/deploy checks the two
agree.

    python deploy/monitoring/prometheusrule.py
"""
from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEADER = "# Generated from rules.yaml by prometheusrule.py: edit rules.yaml, then run it.\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as block literals, as rules.yaml writes them."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render(rules: dict) -> str:
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "tensafe", "labels": {"app.kubernetes.io/name": "tensafe",
                                                   "app.kubernetes.io/component": "monitoring"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def main() -> None:
    rules = yaml.safe_load((HERE / "rules.yaml").read_text())
    (HERE / "prometheusrule.yaml").write_text(render(rules))


if __name__ == "__main__":
    main()

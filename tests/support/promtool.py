"""Prometheus's `promtool` for the alert-rule tests (or a skip that says why there is none), and the
PrometheusRule manifest generated from the plain rule file.

`.venv/bin/python -m tests.support.promtool` rewrites k8s/monitoring/prometheusrule.yaml from
k8s/monitoring/renderflow-rules.yaml; tests/integration/test_alert_rules.py fails while they differ.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "renderflow-rules.yaml"
RULES_TESTS = MONITORING / "renderflow-rules.test.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
TIMEOUT_S = 60.0
"""promtool checks and tests these rules in well under a second; past this it is stuck."""

_HEADER = """\
# GENERATED from renderflow-rules.yaml by `.venv/bin/python -m tests.support.promtool`: edit that
# file and run the command (tests/integration/test_alert_rules.py fails while the two differ).
#
# Renderflow's SLO recording rules and alerts as a PrometheusRule, for the Prometheus Operator. A
# custom resource, hence not in k8s/kustomization.yaml (applying it without the operator's CRDs
# fails): `kubectl apply -f k8s/monitoring/prometheusrule.yaml`. The operator loads it when its
# Prometheus's ruleSelector and ruleNamespaceSelector match this object's labels and namespace;
# add the label your Prometheus selects (often `release: <its Helm release>`) in an overlay.
"""


def promtool() -> str:
    """The path of `promtool`, or a skip saying how to get it."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): alert rules untested")
    return binary


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS`, run in k8s/monitoring (where the test file names its rule file)."""
    return subprocess.run(
        [promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


class _Dumper(yaml.SafeDumper):
    """YAML as the rule file writes it: lists indented under their key, block scalars for
    multi-line strings (PromQL expressions)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def prometheus_rule(rules: Path = RULES) -> str:
    """The PrometheusRule manifest holding the groups of the rule file `rules`, as YAML text."""
    groups: list[dict[str, Any]] = yaml.safe_load(rules.read_text())["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "renderflow",
            "namespace": "renderflow",
            "labels": {"app.kubernetes.io/name": "renderflow", "app.kubernetes.io/part-of": "renderflow"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return _HEADER + body


def main() -> None:
    PROMETHEUS_RULE.write_text(prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""The Grafana dashboards of k8s/dashboards/: valid dashboard JSON, provisioned from the folder the
ConfigMap holding exactly those files is mounted at, and every panel's every query returning series
from a real Prometheus scraping a real stack after a little load (a skip when Prometheus is not
installed).

After changing a dashboard, rewrite the ConfigMap: `.venv/bin/python -m tests.integration.test_dashboards`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.generation.backends import (
    Backend,
)
from services.generation.background import background
from shared.resource_metrics import measure_event_loop_lag
from tests.support.backends import FlakyBackend
from tests.support.observed_stack import ObservedStack
from tests.support.prometheus import Prometheus, QueryError, serving_prometheus

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "k8s" / "dashboards"
CONFIGMAP = DASHBOARDS / "configmap.yaml"
PROVIDER = DASHBOARDS / "provider.yml"
NAMESPACE = "renderflow"
DASHBOARDS_CONFIGMAP = "renderflow-dashboards"
PROVIDER_CONFIGMAP = "renderflow-dashboards-provider"
MOUNT_PATH = "/var/lib/grafana/dashboards/renderflow"
"""Where Grafana's pod mounts the dashboards' ConfigMap: the provider's folder."""
PROVIDER_KEY = "renderflow.yml"

RATE_INTERVAL = "30s"
"""`$__rate_interval` in the tests: Prometheus scrapes every second, a test lasts seconds."""
TEST_VALUES = {"__rate_interval": RATE_INTERVAL, "route": ".*", "kind": ".*", "pool": ".*"}
"""What each variable the queries use stands for here (the `All` of the dashboards' variables)."""
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")
GRID_WIDTH = 24
QUERY_PATIENCE_S = 15.0
"""How long an empty answer is retried (a gauge refreshed late, a scrape in flight) before failing."""


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def queried_panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel but rows, those of collapsed rows included."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variables(board: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}


def substitute(expr: str) -> str:
    """`expr` with each variable replaced by its test value (KeyError for one we do not know)."""
    return VARIABLE.sub(lambda m: TEST_VALUES[m.group(1) or m.group(2)], expr)


# -- the files ------------------------------------------------------------------------------------


def test_there_are_the_three_boards() -> None:
    assert [path.name for path in dashboard_files()] == [
        "renderflow-database.json",
        "renderflow-overview.json",
        "renderflow-render-pipeline.json",
    ]


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.stem)
def test_dashboard_is_grafana_dashboard_json(path: Path) -> None:
    board = load(path)
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] == path.stem and len(board["uid"]) <= 40
    assert board["title"].startswith("Renderflow / ")
    assert board.get("id") is None, "provisioned dashboards carry no database id"
    panels = board["panels"]
    assert panels
    ids = [panel["id"] for panel in panels] + [p["id"] for row in panels for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    declared = variables(board)
    assert declared["datasource"]["type"] == "datasource" and declared["datasource"]["query"] == "prometheus"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    for panel in queried_panels(board):
        title = panel["title"]
        assert panel["type"] in ("timeseries", "stat", "bargauge", "gauge", "table"), title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        targets = panel["targets"]
        assert targets, f"{title!r} has no targets"
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), f"{title!r} repeats refIds {refs}"
        for target in targets:
            assert target["expr"].strip(), title
            used = {a or b for a, b in VARIABLE.findall(target["expr"])}
            unknown = used - set(declared) - {"__rate_interval"}
            assert not unknown, f"{title!r} uses undeclared variables {unknown}: {target['expr']}"
            assert used <= set(TEST_VALUES), f"{title!r}: no test value for {used - set(TEST_VALUES)}"
    for name, variable in declared.items():
        if variable["type"] == "query":
            assert LABEL_VALUES.match(variable["query"]["query"]), name
            assert variable["allValue"] == TEST_VALUES[name], name


def test_provider_reads_the_folder_the_dashboards_are_mounted_at() -> None:
    provider = yaml.safe_load(PROVIDER.read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert entry["folder"] == "Renderflow"
    assert entry["options"]["path"] == MOUNT_PATH


def test_configmaps_hold_exactly_the_dashboards_and_the_provider() -> None:
    documents = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(CONFIGMAP.read_text()) if doc}
    assert set(documents) == {DASHBOARDS_CONFIGMAP, PROVIDER_CONFIGMAP}
    for doc in documents.values():
        assert (doc["apiVersion"], doc["kind"]) == ("v1", "ConfigMap")
        assert doc["metadata"]["namespace"] == NAMESPACE
    expected = {path.name: path.read_text() for path in dashboard_files()}
    hint = "rewrite it: .venv/bin/python -m tests.integration.test_dashboards"
    assert documents[DASHBOARDS_CONFIGMAP]["data"] == expected, (
        f"{CONFIGMAP.name} differs from the JSON files; {hint}"
    )
    assert documents[PROVIDER_CONFIGMAP]["data"] == {PROVIDER_KEY: PROVIDER.read_text()}, hint
    assert CONFIGMAP.read_text() == configmap_manifest(), hint


# -- the queries against a real Prometheus -------------------------------------------------------


@pytest.fixture
def worker_backends() -> Mapping[str, Backend]:
    return {"procedural": FlakyBackend()}


@pytest.fixture
async def event_loop_lag() -> AsyncIterator[None]:
    """The lag measurement each process's lifecycle runs (shared.lifecycle), which the in-process
    stack does not go through."""
    async with background(measure_event_loop_lag(interval_s=0.1), "event-loop-lag"):
        yield


async def make_load(stack: ObservedStack) -> None:
    """Renders that succeed, retry, fetch a reference (a retry at the origin, then from the cache,
    two at once: coalesced), fail on a missing reference; a submit to an unknown project; reads."""
    ids = []
    for prompt in ("plain", "flaky"):
        status, render = await stack.submit(prompt=prompt)
        assert status == 202, render
        ids.append(render["id"])
    image = stack.origin.url("/flaky/dashboards")
    for prompt in ("first", "second"):
        _, render = await stack.submit(prompt=prompt, reference={"url": image})
        ids.append(render["id"])
        await stack.finished(render["id"])
    slow = stack.origin.url("/slow/dashboards?delay=0.5")
    for prompt in ("together", "at-once"):
        _, render = await stack.submit(prompt=prompt, reference={"url": slow})
        ids.append(render["id"])
    _, failing = await stack.submit(
        prompt="failing", reference={"url": stack.origin.url("/status/404?d=1"), "required": True}
    )
    ids.append(failing["id"])
    await stack.finished(*ids)
    status, _ = await stack.submit(project="nowhere", prompt="lost")
    assert status == 404
    async with stack.http.get(f"{stack.base}/v1/renders/{ids[0]}", headers=stack.headers) as response:
        assert response.status == 200


async def returns_series(prometheus: Prometheus, expr: str) -> str | None:
    """None when `expr` returns series, within QUERY_PATIENCE_S; else what went wrong."""
    deadline = time.monotonic() + QUERY_PATIENCE_S
    while True:
        try:
            if await prometheus.query(expr):
                return None
        except QueryError as error:
            return f"error: {error}"
        if time.monotonic() > deadline:
            return "no series"
        await asyncio.sleep(0.5)


async def test_every_panel_query_returns_series(
    observed: ObservedStack, service_metrics_url: str, event_loop_lag: None, tmp_path: Path
) -> None:
    targets = {"gateway": f"{observed.base}/metrics", "services": service_metrics_url}
    async with serving_prometheus(targets, tmp_path / "prometheus") as prometheus:
        await make_load(observed)
        await prometheus.wait_for_scrapes_after(time.time())
        queries: list[tuple[str, str]] = []
        for path in dashboard_files():
            board = load(path)
            for name, variable in variables(board).items():
                if variable["type"] == "query":
                    match = LABEL_VALUES.match(variable["query"]["query"])
                    assert match, name
                    metric, label = match.groups()
                    queries.append((f"{path.stem}: variable ${name}", f"count by ({label}) ({metric})"))
            for panel in queried_panels(board):
                for target in panel["targets"]:
                    where = f"{path.stem}: {panel['title']!r} ({target['refId']})"
                    queries.append((where, substitute(target["expr"])))
        failures = []
        for where, expr in queries:
            problem = await returns_series(prometheus, expr)
            if problem:
                failures.append(f"{where}: {problem}\n    {expr}")
        assert not failures, f"{len(failures)} of {len(queries)} queries failed:\n" + "\n".join(failures)


# -- the ConfigMap, written from the files -------------------------------------------------------


class _Literal(str):
    """A string dumped as a YAML literal block."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Literal, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")
)

CONFIGMAP_HEADER = f"""\
# Grafana dashboards of Renderflow (overview, render pipeline, database pools and runtime), written from
# k8s/dashboards/*.json and provider.yml by `.venv/bin/python -m tests.integration.test_dashboards`:
# edit those files, then rewrite this one. Not in k8s/kustomization.yaml: apply it where Grafana runs
# (`kubectl apply -f k8s/dashboards/configmap.yaml`), then mount {DASHBOARDS_CONFIGMAP} at
# {MOUNT_PATH} and {PROVIDER_CONFIGMAP} in /etc/grafana/provisioning/dashboards. Grafana's
# dashboard sidecar (kube-prometheus-stack) picks {DASHBOARDS_CONFIGMAP} up by its grafana_dashboard label.
# The dashboards need a Prometheus data source scraping every process's /metrics.
"""


def configmap_manifest() -> str:
    """configmap.yaml as the files on disk make it."""
    dashboards = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": DASHBOARDS_CONFIGMAP,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "renderflow", "grafana_dashboard": "1"},
        },
        "data": {path.name: _Literal(path.read_text()) for path in dashboard_files()},
    }
    provider = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": PROVIDER_CONFIGMAP,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "renderflow"},
        },
        "data": {PROVIDER_KEY: _Literal(PROVIDER.read_text())},
    }
    body = yaml.dump_all([dashboards, provider], Dumper=_Dumper, sort_keys=False, width=1_000_000)
    return CONFIGMAP_HEADER + body


if __name__ == "__main__":
    CONFIGMAP.write_text(configmap_manifest())
    print(f"wrote {CONFIGMAP.relative_to(REPO)}")

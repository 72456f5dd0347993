"""Renderflow's SLOs and alerts (k8s/monitoring/renderflow-rules.yaml): `promtool check rules`, the
promtool unit tests that make every alert fire on synthetic series (and stay quiet where they must),
the PrometheusRule kept equal to the rule file, a runbook section behind every alert, and only
metrics, labels and label values the code really exposes, so that renaming one fails here (a skip
that says why when promtool is not installed)."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shared.contract import KINDS, PHASES, STATUSES
from shared.metrics import DURATION_BUCKETS_S, build_meter_provider, exposition
from tests.support.promtool import PROMETHEUS_RULE, ROOT, RULES, RULES_TESTS, prometheus_rule, run_promtool

RUNBOOK = ROOT / "docs" / "runbook.md"
README = ROOT / "README.md"
METRICS_REFERENCE = ROOT / "docs" / "operations.md"
SOURCES = ("gateway", "services", "shared")
SEVERITIES = {"page", "ticket"}
WINDOWS = ("5m", "30m", "1h", "6h")
# The multiwindow pairs of the SRE workbook: (long window, short window, burn rate) by severity.
BURNS = {"page": ("1h", "5m", 14.4), "ticket": ("6h", "30m", 6.0)}
# Labels Prometheus adds to every scraped series, whatever the process exposes.
TARGET_LABELS = {"job", "instance"}
# Label values that come from outside the code, passed on as they are.
EXTERNAL_VALUES = {
    "content_policy_violation": "OpenAI's error code for a refused prompt, the reason of its failure",
}

Rule = dict[str, Any]


def _groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def _rules() -> list[Rule]:
    return [rule for group in _groups() for rule in group["rules"]]


def _alerts() -> list[Rule]:
    return [rule for rule in _rules() if "alert" in rule]


# --- promtool -----------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    checked = run_promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_promtool_unit_tests_pass() -> None:
    """Each alert fires on synthetic series, with its labels and annotations as written in the test
    file, and stays quiet on the series that must not page."""
    tested = run_promtool("test", "rules", RULES_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(RULES_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alerts()}
    assert alerts - firing == set(), "never fired by a test"
    assert alerts - quiet == set(), "never shown quiet by a test"
    assert (firing | quiet) - alerts == set(), "tests of alerts the rules lack"


# --- the rules themselves -----------------------------------------------------------------------


def test_the_prometheusrule_holds_the_rule_file() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheus_rule(), (
        "k8s/monitoring/prometheusrule.yaml differs from renderflow-rules.yaml: "
        "run `.venv/bin/python -m tests.support.promtool`"
    )
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["metadata"]["namespace"] == "renderflow"
    assert manifest["spec"]["groups"] == _groups()


def test_every_alert_has_a_severity_and_what_a_responder_needs() -> None:
    for alert in _alerts():
        assert alert["labels"]["severity"] in SEVERITIES, alert["alert"]
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}, alert["alert"]
        assert alert["annotations"]["runbook_url"] == f"docs/runbook.md#{alert['alert'].lower()}"


def _window_free(expr: str) -> str:
    return re.sub(r"(\[|rate)(5m|30m|1h|6h)\b", r"\1W", expr)


def test_each_sli_is_recorded_alike_over_every_window() -> None:
    """The four windows of an SLI differ in their window only (a typo in one would skew one alert)."""
    by_series: dict[tuple[str, str], dict[str, str]] = {}
    for rule in _rules():
        found = re.fullmatch(r"(renderflow:\w+:\w*?rate)(5m|30m|1h|6h)", rule.get("record", ""))
        if found is not None:
            series = (found.group(1), rule.get("labels", {}).get("slo", ""))
            by_series.setdefault(series, {})[found.group(2)] = rule["expr"]
    assert {slo for _, slo in by_series} >= set(_objectives())
    for series, exprs in by_series.items():
        assert sorted(exprs) == sorted(WINDOWS), series
        for window, expr in exprs.items():
            used = re.findall(r"\[(\w+)\]", expr) + re.findall(r"rate(\d+[smhd])\b", expr)
            assert set(used) == {window}, (series, window)
        assert len({_window_free(expr) for expr in exprs.values()}) == 1, series


def _objectives() -> dict[str, float]:
    objectives: dict[str, float] = {}
    for rule in _rules():
        if rule.get("record") == "renderflow:slo_objective:ratio":
            found = re.fullmatch(r"vector\(([\d.]+)\)", rule["expr"])
            assert found is not None, rule
            objectives[rule["labels"]["slo"]] = float(found.group(1))
    return objectives


def test_every_slo_pages_and_tickets_on_the_workbooks_burn_rates() -> None:
    objectives = _objectives()
    assert objectives == {
        "submit_availability": 0.999,
        "submit_latency": 0.99,
        "render_success": 0.99,
        "time_to_start": 0.95,
    }
    condition = re.compile(
        r'renderflow:slo_errors:ratio_rate(\w+)\{slo="(\w+)"\} > \(([\d.]+) \* \(1 - ([\d.]+)\)\)'
    )
    alerted: set[tuple[str, str]] = set()
    for alert in _alerts():
        conditions = condition.findall(alert["expr"])
        if not conditions:
            continue
        severity = alert["labels"]["severity"]
        long, short, burn = BURNS[severity]
        assert [c[0] for c in conditions] == [long, short], alert["alert"]
        (slo,) = {c[1] for c in conditions}  # both windows of one SLO
        assert {(float(c[2]), float(c[3])) for c in conditions} == {(burn, objectives[slo])}, alert["alert"]
        assert re.search(r"\}[^\n]*\n\s*and\s*\n", alert["expr"]), f"{alert['alert']}: both windows must burn"
        alerted.add((slo, severity))
    assert alerted == {(slo, severity) for slo in objectives for severity in BURNS}


# --- the runbook and the README -----------------------------------------------------------------


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a page."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_alert_links_a_section_of_the_runbook() -> None:
    anchors = _anchors(RUNBOOK.read_text())
    missing = [
        alert["annotations"]["runbook_url"]
        for alert in _alerts()
        if alert["annotations"]["runbook_url"].partition("#")[2] not in anchors
    ]
    assert missing == [], "runbook sections missing"
    sections = {anchor for anchor in anchors if re.fullmatch(r"renderflow[a-z]+", anchor)}
    assert sections == {alert["alert"].lower() for alert in _alerts()}, "runbook sections of no alert"


def test_the_readme_lists_every_alert_with_its_runbook_link() -> None:
    readme = README.read_text()
    for alert in _alerts():
        assert f"[{alert['alert']}]({alert['annotations']['runbook_url']})" in readme, alert["alert"]


# --- metrics, labels and values the code exposes ------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """A series selector of an expression: its metric name and label matchers (name, op, value)."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...]


_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},])
  | (?P<space>\s+)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        found = _TOKEN.match(expr, at)
        assert found is not None and found.lastgroup is not None, f"cannot read {expr[at:]!r}"
        if found.lastgroup != "space":
            tokens.append((found.lastgroup, found.group()))
        at = found.end()
    return tokens


def _selectors(expr: str) -> list[Selector]:
    """The series selectors of a PromQL expression (functions, aggregations, keywords and grouping
    labels are not)."""
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    at = 0
    while at < len(tokens):
        kind, text = tokens[at]
        following = tokens[at + 1][1] if at + 1 < len(tokens) else ""
        if kind == "name" and text in _GROUPING and following == "(":
            at = next(i for i in range(at, len(tokens)) if tokens[i][1] == ")") + 1
            continue
        if kind == "name" and following in _GROUPING:  # an aggregation: `sum by (...)`
            at += 1
            continue
        if kind == "name" and text not in _KEYWORDS and following != "(":
            matchers: list[tuple[str, str, str]] = []
            at += 1
            if following == "{":
                at += 1
                while tokens[at][1] != "}":
                    (_, label), (_, op), (_, value) = tokens[at : at + 3]
                    matchers.append((label, op, ast.literal_eval(value)))
                    at += 4 if tokens[at + 3][1] == "," else 3
                at += 1
            selectors.append(Selector(text, tuple(matchers)))
            continue
        at += 1
    return selectors


def test_the_expression_reader_finds_selectors_and_nothing_else() -> None:
    expr = (
        'sum by (pool) (rate(a_total{x=~"1|2", y!="z"}[5m])) / ignoring (state) b '
        'and on (kind) absent(c{d="e"}) > bool 0.5 unless vector(1)'
    )
    assert _selectors(expr) == [
        Selector("a_total", (("x", "=~", "1|2"), ("y", "!=", "z"))),
        Selector("b", ()),
        Selector("c", (("d", "=", "e"),)),
    ]


def _python_files() -> Iterator[Path]:
    for top in SOURCES:
        yield from sorted((ROOT / top).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def _instruments() -> dict[str, tuple[str, str]]:
    """Every instrument the code creates with a literal name: {name: (create_* method, unit)}.
    Names built at run time (the ComfyUI instance gauges) are left out."""
    found: dict[str, tuple[str, str]] = {}
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _call_name(node).startswith("create_"):
                name = _literal(node.args[0] if node.args else _keyword(node, "name"))
                if name is not None and _call_name(node) in _CREATE:
                    found[name] = (_call_name(node), _literal(_keyword(node, "unit")) or "")
    return found


def _observed(options: CallbackOptions) -> list[Observation]:
    return [Observation(1)]


_CREATE: dict[str, Callable[[Meter, str, str], object]] = {
    "create_counter": lambda meter, name, unit: meter.create_counter(name, unit=unit).add(1),
    "create_up_down_counter": lambda meter, name, unit: meter.create_up_down_counter(name, unit=unit).add(1),
    "create_histogram": lambda meter, name, unit: meter.create_histogram(name, unit=unit).record(1),
    "create_gauge": lambda meter, name, unit: meter.create_gauge(name, unit=unit).set(1),
    "create_observable_gauge": lambda meter, name, unit: meter.create_observable_gauge(
        name, [_observed], unit=unit
    ),
    "create_observable_counter": lambda meter, name, unit: meter.create_observable_counter(
        name, [_observed], unit=unit
    ),
    "create_observable_up_down_counter": lambda meter, name, unit: meter.create_observable_up_down_counter(
        name, [_observed], unit=unit
    ),
}


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """The Prometheus names of the code's instruments, as the processes' own exporter set-up
    (`shared.metrics`) writes them on /metrics: each instrument made on a private provider,
    measured once and read back."""
    instruments = _instruments()
    assert "renderflow.http.server.requests" in instruments, "the instrument scan finds nothing"
    registry = CollectorRegistry()
    provider = build_meter_provider(Resource.create({}), registry)
    try:
        meter = provider.get_meter("test_alert_rules")
        for name, (create, unit) in instruments.items():
            _CREATE[create](meter, name, unit)
        body, _ = exposition(None, registry)
    finally:
        provider.shutdown()
    families = text_string_to_metric_families(body.decode())
    return {sample.name for family in families for sample in family.samples}


def _rule_selectors() -> Iterator[tuple[str, Selector]]:
    for rule in _rules():
        for selector in _selectors(rule["expr"]):
            yield rule.get("alert") or rule["record"], selector


def test_every_metric_the_rules_read_is_one_the_code_exposes(exposed: set[str]) -> None:
    """Renaming an instrument (or its unit, or its kind) fails here."""
    assert "renderflow_http_server_duration_seconds_bucket" in exposed
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    unknown = {
        (rule, selector.metric)
        for rule, selector in _rule_selectors()
        if selector.metric not in exposed | recorded
    }
    assert unknown == set()


def _documented_labels() -> dict[str, set[str]]:
    """The labels of each metric of the reference table in docs/operations.md ("### Metrics")."""
    text = METRICS_REFERENCE.read_text()
    table = text[text.index("### Metrics") : text.index("### Traces")]
    labels: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (`.+)\|$", table, re.MULTILINE):
        names, _, _, labelled, _ = (cell.strip() for cell in row.split("|"))
        for name in re.findall(r"`(\w+)`", names):
            labels[name] = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labelled)))
    return labels


def _base(metric: str) -> str:
    return re.sub(r"_(bucket|count|sum)$", "", metric)


def test_every_label_the_rules_match_is_in_the_metrics_reference() -> None:
    documented = _documented_labels()
    assert documented["renderflow_db_pool_connections"] == {"pool", "state"}, "the table reads wrong"
    wrong = []
    for rule, selector in _rule_selectors():
        if selector.metric.startswith("renderflow:"):
            continue
        allowed = documented.get(_base(selector.metric))
        if allowed is None:
            wrong.append((rule, selector.metric, "not in the reference"))
            continue
        allowed = allowed | TARGET_LABELS | ({"le"} if selector.metric.endswith("_bucket") else set())
        wrong += [(rule, selector.metric, label) for label, _, _ in selector.matchers if label not in allowed]
    assert wrong == []


def _string_literals() -> set[str]:
    return {
        node.value
        for path in _python_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def _routes() -> set[tuple[str, str]]:
    """(method, path) of every gateway route (`@routes.post("/v1/renders")`)."""
    served = set()
    for path in sorted((ROOT / "gateway" / "routes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                route = _literal(node.args[0]) if node.args else None
                if isinstance(owner, ast.Name) and owner.id == "routes" and route is not None:
                    served.add((node.func.attr.upper(), route))
    return served


def _alternatives(op: str, value: str) -> list[str]:
    """The literal values a matcher names: its value, or a regex's alternatives that are no patterns
    (`http_4..` is one)."""
    if op in ("=", "!="):
        return [value]
    return [choice for choice in value.split("|") if not re.search(r"[.*+?()\[\]\\^$]", choice)]


def test_every_label_value_the_rules_match_is_one_the_code_writes() -> None:
    """Phases, statuses, kinds, routes, buckets, pools, error codes and reasons: a value renamed in
    the code (or misspelt here) fails."""
    literals = _string_literals() | set(EXTERNAL_VALUES)
    routes = _routes()
    wrong = []
    for rule, selector in _rule_selectors():
        if ":" in selector.metric:  # a recorded series: its labels are the rule file's own
            continue
        labels = {label: (op, value) for label, op, value in selector.matchers}
        for label, op, value in selector.matchers:
            values = _alternatives(op, value)
            if label == "phase":
                bad = [v for v in values if v not in PHASES]
            elif label == "status":
                bad = [v for v in values if v not in STATUSES]
            elif label == "render_kind":
                bad = [v for v in values if v not in KINDS]
            elif label == "le":
                bad = [v for v in values if v != "+Inf" and float(v) not in DURATION_BUCKETS_S]
            elif label == "http_response_status_class":
                bad = [v for v in values if not re.fullmatch(r"[1-5]xx", v)]
            elif label == "http_request_method":
                bad = [v for v in values if v not in {method for method, _ in routes}]
            elif label == "http_route":
                method = labels.get("http_request_method")
                methods = _alternatives(*method) if method is not None else []
                served = {path for method, path in routes if not methods or method in methods}
                bad = [v for v in values if v not in served]
            else:
                bad = [v for v in values if v not in literals]
            wrong += [(rule, selector.metric, label, v) for v in bad]
    assert wrong == []


def test_the_worker_heartbeat_alert_reads_the_pool_only_workers_open() -> None:
    """RenderflowWorkersAbsent stands for worker processes by their pool's name: it must be the
    workers' own (renamed, the alert would fire for ever, or never)."""
    (alert,) = [rule for rule in _alerts() if rule["alert"] == "RenderflowWorkersAbsent"]
    (selector,) = _selectors(alert["expr"])
    (pool,) = [value for label, _, value in selector.matchers if label == "pool"]
    named: dict[str, set[str]] = {}
    for path in _python_files():
        calls = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]
        for call in calls:
            name = _literal(_keyword(call, "name"))
            if name is not None and _call_name(call) in ("open_pool", "opened"):
                named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert named.get(pool) == {"services/generation/worker.py"}, named

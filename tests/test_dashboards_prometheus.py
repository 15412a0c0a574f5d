"""Every dashboard query and alert rule, run for real on Prometheus scraping ``asyncdiag demo``.

The demo service (``asyncdiag demo --rounds 0``, the same command as in docker-compose.yml)
exports through the OpenTelemetry SDK's Prometheus exporter (``OTEL_METRICS_EXPORTER=
prometheus``); a real Prometheus on 127.0.0.1 scrapes it every second and evaluates the alert
rules of ``deploy/prometheus/rules``. Each panel query is then run through Prometheus's HTTP
API with the dashboard variables filled in as Grafana would, and must return data. The
panels the demo cannot exercise are listed in ``NOT_EXERCISED`` with the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from test_dashboards import RULES, Query, dashboard_queries, rule_queries, variable_queries

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus binary missing (Debian: apt-get install -y prometheus)",
)

SERVICE = "asyncdiag-dashboard-test"
# Grafana's built-in intervals for a "last 5 minutes" view of a 1 s scrape interval.
RATE_INTERVAL = "10s"
RANGE = "5m"
INTERVAL = "2s"
# From Prometheus start; the demo's first round needs ~3 s, and rates need two scrapes after.
DEADLINE_SECONDS = 40.0

# Queries the demo cannot make return data, and why. They still run (a syntax or name error
# fails the fixture); their test reports the reason as a skip.
NOT_EXERCISED: dict[str, str] = {
    "alert AsyncdiagAsyncgenActiveGrowing": (
        "the demo finishes, closes or orphans every async generator it starts, so the "
        "active-generator gauge does not climb by 100 an hour (the rule's logic is covered "
        "by deploy/prometheus/asyncdiag.rules.test.yml; its left-hand side is checked here)"
    ),
}
# Queries whose only honest value with the demo may be 0 (keyed by panel title or rule); all
# others must show activity (a value other than 0), not merely a series of zeros.
ZERO_OK: dict[str, str] = {
    "Active async generators": (
        "a point-in-time gauge: the demo's generators live for milliseconds, so a scrape "
        "usually sees 0 of them (the series must exist, and does once a generator started)"
    ),
    "alert AsyncdiagAsyncgenActiveGrowing (without threshold)": (
        "the derivative of that gauge, 0 when nothing leaks"
    ),
}
# Alert states expected while the demo runs (rules with ``for:`` are pending in a short run).
EXPECTED_ALERTS = {
    "AsyncdiagLoopBlocked": {"firing"},
    "AsyncdiagLoopLagHigh": {"pending", "firing"},
    "AsyncdiagOrphanedAsyncgensRising": {"pending", "firing"},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def regex_escape(value: str) -> str:
    """Grafana's escaping of a multi-value variable for a Prometheus ``=~`` matcher: regex
    escapes, themselves escaped for the double-quoted PromQL string (``a\\\\.b``)."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def fill(expr: str, subject: str = ".*") -> str:
    values = {
        "job": SERVICE, "asyncdiag_subject": subject, "kind": ".*",
        "__rate_interval": RATE_INTERVAL, "__range": RANGE, "__interval": INTERVAL,
    }
    filled = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
    assert "$" not in filled, filled
    return filled


@dataclass
class Stack:
    prometheus_url: str
    started: float
    demo: subprocess.Popen[bytes]
    demo_log: Path
    prometheus: subprocess.Popen[bytes]
    prometheus_log: Path
    notes: list[str] = field(default_factory=list)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            payload = json.loads(http_get(url))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: HTTP {exc.code}: {exc.read()!r}") from exc
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str, *, instant: bool) -> list[dict[str, Any]]:
        if instant:
            result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        else:
            result = self.api("query_range", query=expr, start=f"{self.started:.3f}",
                              end=f"{time.time():.3f}", step="1")["result"]
        return result

    def logs(self) -> str:
        def tail(path: Path) -> str:
            return path.read_text(errors="replace")[-3000:] if path.exists() else ""
        return (f"--- demo (exit {self.demo.poll()}) ---\n{tail(self.demo_log)}\n"
                f"--- prometheus (exit {self.prometheus.poll()}) ---\n{tail(self.prometheus_log)}")


def values_of(result: list[dict[str, Any]]) -> list[float]:
    out = []
    for series in result:
        samples = series.get("values") or [series["value"]]
        out += [float(v) for _, v in samples]
    return out


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with one real number (NaN is what histogram_quantile gives an
    empty window: Grafana draws nothing for it)."""
    return any(not math.isnan(v) for v in values_of(result))


def has_activity(result: list[dict[str, Any]]) -> bool:
    """At least one real number other than 0: a heatmap or a rate of only zeros means the
    series exists but nothing was measured."""
    return any(not math.isnan(v) and v != 0 for v in values_of(result))


def satisfied(query: Query, result: list[dict[str, Any]]) -> bool:
    if (query.panel or query.where) in ZERO_OK:
        return has_data(result)
    return has_activity(result)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout: float,
               logs: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http_get(url, timeout=2)
            return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer at {url}\n{logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus")
    exporter_port, prometheus_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "ASYNCDIAG_"))}
    env.update({
        "OTEL_SERVICE_NAME": SERVICE,
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(exporter_port),
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "PYTHONUNBUFFERED": "1",
    })
    demo_log = tmp / "demo.log"
    with demo_log.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "asyncdiag", "demo", "--rounds", "0", "--interval", "0.2"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML; no dependency on the YAML writer
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            # Scraping the SDK directly, the job is the scrape job: name it after the
            # service, as docs/dashboards.md tells users to.
            "job_name": SERVICE,
            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
        }],
    }))
    prometheus_log = tmp / "prometheus.log"
    assert PROMETHEUS is not None
    with prometheus_log.open("wb") as out:
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    running = Stack(f"http://127.0.0.1:{prometheus_port}", time.time(), demo, demo_log,
                    prometheus, prometheus_log)
    try:
        _wait_http(f"http://127.0.0.1:{exporter_port}/metrics", demo,
                   "the demo's Prometheus exporter", 20, running.logs)
        _wait_http(f"{running.prometheus_url}/-/ready", prometheus, "Prometheus", 20,
                   running.logs)
        yield running
    finally:
        _stop(demo)
        _stop(prometheus)


def _expected_queries() -> list[Query]:
    """Every dashboard query, and every rule expression with and without its threshold."""
    out = list(dashboard_queries())
    for rule in rule_queries():
        lhs, _, threshold = rule.expr.rpartition(" > ")
        assert lhs and float(threshold) >= 0, rule.expr
        out.append(rule)
        out.append(Query("rule", f"{rule.where} (without threshold)", lhs, instant=True))
    return [q if q.source != "rule" else Query(q.source, q.where, q.expr, instant=True)
            for q in out]


QUERIES = _expected_queries()


@pytest.fixture(scope="module")
def results(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    """Runs every query once a second until each one that should has data, or the deadline."""
    got: dict[str, list[dict[str, Any]]] = {}
    alerts: dict[str, str] = {}
    while True:
        assert stack.demo.poll() is None, f"the demo service exited\n{stack.logs()}"
        for query in QUERIES:
            got[query.where] = stack.query(fill(query.expr), instant=query.instant)
        alerts = {a["labels"]["alertname"]: a["state"] for a in stack.api("alerts")["alerts"]}
        missing = [q.where for q in QUERIES
                   if q.where not in NOT_EXERCISED and not satisfied(q, got[q.where])]
        alerts_due = [a for a, states in EXPECTED_ALERTS.items() if alerts.get(a) not in states]
        if not missing and not alerts_due:
            break
        if time.time() - stack.started > DEADLINE_SECONDS:
            break
        time.sleep(1)
    stack.notes.append(f"data after {time.time() - stack.started:.1f} s")
    got["__alerts__"] = [{"alerts": alerts}]
    _print_summary(stack, got)
    return got


def _print_summary(stack: Stack, got: dict[str, list[dict[str, Any]]]) -> None:
    lines = [f"dashboard queries on Prometheus ({'; '.join(stack.notes)}):"]
    for query in QUERIES:
        result = got[query.where]
        if query.where in NOT_EXERCISED:
            status = "empty (not exercised)" if not values_of(result) else "DATA (unexpected)"
        elif satisfied(query, result):
            status = f"{len(result)} series"
        else:
            status = "zeros only" if has_data(result) else "NO DATA"
        lines.append(f"  {status:>22}  {query.where}")
    lines.append(f"  alerts: {got['__alerts__'][0]['alerts']}")
    print("\n".join(lines), file=sys.stderr)


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.where)
def test_query_returns_data(query: Query, stack: Stack,
                            results: dict[str, list[dict[str, Any]]]) -> None:
    result = results[query.where]
    if query.where in NOT_EXERCISED:
        # Not asserted empty either: with seconds of data, one scrape that happens to see a
        # live generator makes deriv() large, so emptiness would be luck, not a property.
        pytest.skip(f"not exercised by the demo: {NOT_EXERCISED[query.where]}")
    assert satisfied(query, result), (
        f"{query.where}: no data (or only zeros) from {fill(query.expr)}: {str(result)[:400]}\n"
        f"{stack.logs()}")


def test_alerts_fire_while_the_demo_runs(stack: Stack,
                                         results: dict[str, list[dict[str, Any]]]) -> None:
    alerts = results["__alerts__"][0]["alerts"]
    for name, states in EXPECTED_ALERTS.items():
        assert alerts.get(name) in states, f"{name}: {alerts.get(name)}, want {states}"
    groups = stack.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {q.where.split()[-1] for q in rule_queries()}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_template_variables_find_the_service_and_its_subjects(
        stack: Stack, results: dict[str, list[dict[str, Any]]]) -> None:
    params = {"start": f"{stack.started:.3f}", "end": f"{time.time():.3f}"}
    for where, label, match, _ in variable_queries():
        extra = {"match[]": fill(match)} if match else {}
        values = stack.api(f"label/{label}/values", **params, **extra)
        assert values, f"{where}: no values for {label} ({match})"
        if label == "job":
            assert SERVICE in values


def test_subject_queries_with_every_subject_selected(
        stack: Stack, results: dict[str, list[dict[str, Any]]]) -> None:
    """As Grafana interpolates a multi-value selection: ``(a|b|...)``, regex-escaped."""
    subjects = stack.api("label/asyncdiag_subject/values", **{
        "match[]": f'{{__name__=~"asyncdiag_.+", job="{SERVICE}"}}',
        "start": f"{stack.started:.3f}", "end": f"{time.time():.3f}"})
    assert subjects
    selected = "(" + "|".join(regex_escape(s) for s in subjects) + ")"
    for query in dashboard_queries():
        if "$asyncdiag_subject" not in query.expr:
            continue
        result = stack.query(fill(query.expr, selected), instant=query.instant)
        assert has_data(result) == has_data(results[query.where]), query.where

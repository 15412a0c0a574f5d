"""Writes the Grafana dashboards of this folder: ``python dashboards/generate.py``.

The JSON files are the artifact users import or provision; this script exists so that the
three dashboards share one panel style, one set of template variables and one way of
spelling each PromQL query. ``tests/test_dashboards.py`` fails when a JSON file differs from
what this script writes, and when a query names a series asyncdiag does not emit.

Template variables (every dashboard):

* ``DS_PROMETHEUS`` - the Prometheus datasource (a datasource variable, so the files work
  both provisioned and imported by hand);
* ``job`` - the service: Prometheus's ``job`` label, which is the OpenTelemetry
  ``service.name`` when metrics go through an OpenTelemetry Collector (see
  ``deploy/prometheus/prometheus.yml``) and the scrape job's name when Prometheus scrapes the
  SDK's Prometheus endpoint directly;
* ``asyncdiag_subject`` - the instrumented context manager / iterator (multi, "All" = ``.*``).

The findings dashboard also has ``kind`` and ``DS_TRACES`` (the Jaeger datasource the trace
links open).
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

PROM = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
TRACES = {"type": "jaeger", "uid": "${DS_TRACES}"}

JOB = 'job="$job"'
SUBJECT = 'asyncdiag_subject=~"$asyncdiag_subject"'
PROBLEM_OUTCOMES = 'asyncdiag_outcome=~"error|suppressed|cancelled"'

Panel = dict[str, Any]


# -- building blocks ------------------------------------------------------------------------


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
           fmt: str = "time_series") -> dict[str, Any]:
    return {
        "datasource": PROM,
        "editorMode": "code",
        "expr": expr,
        "format": fmt,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "refId": ref,
    }


def quantiles(metric: str, selector: str, by: str, legend_prefix: str) -> list[dict[str, Any]]:
    """p50/p95/p99 from a ``*_seconds_bucket`` series, one target each."""
    grouping = f"le, {by}" if by else "le"
    out = []
    for ref, q in zip("ABC", ("0.5", "0.95", "0.99"), strict=True):
        label = f"p{round(float(q) * 100)}"
        expr = (f"histogram_quantile({q}, sum by ({grouping}) "
                f"(rate({metric}{{{selector}}}[$__rate_interval])))")
        legend = f"{legend_prefix}{label}" if not by else f"{{{{{by}}}}} {label}"
        out.append(target(expr, legend, ref))
    return out


def timeseries(title: str, description: str, targets: list[dict[str, Any]], *, unit: str,
               stack: bool = False, bars: bool = False, min_zero: bool = True,
               thresholds: list[tuple[str, float | None]] | None = None,
               links: list[dict[str, Any]] | None = None) -> Panel:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else (25 if stack else 10),
        "lineWidth": 1,
        "pointSize": 4,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        "axisSoftMin": 0 if min_zero else None,
        "thresholdsStyle": {"mode": "line+area" if thresholds else "off"},
    }
    if not min_zero:
        del custom["axisSoftMin"]
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": custom,
        "color": {"mode": "palette-classic"},
        "thresholds": _thresholds(thresholds),
    }
    if links:
        defaults["links"] = links
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, description: str, expr: str, *, unit: str, no_value: str | None = None,
         thresholds: list[tuple[str, float | None]] | None = None,
         reducer: str = "lastNotNull") -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": _thresholds(thresholds),
    }
    if no_value is not None:
        # An absent counter means "never happened" for these panels; say 0 instead of
        # "No data" without hiding a missing series from the query itself.
        defaults["noValue"] = no_value
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": [target(expr, "", "A")],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": [reducer], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
            "showPercentChange": False,
        },
    }


def heatmap(title: str, description: str, metric: str, selector: str) -> Panel:
    expr = f"sum by (le) (increase({metric}{{{selector}}}[$__rate_interval]))"
    t = target(expr, "{{le}}", "A", fmt="heatmap")
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": [t],
        "fieldConfig": {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}},
                        "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential",
                      "exponent": 0.5, "steps": 64, "fill": "dark-orange", "reverse": False},
            "yAxis": {"axisPlacement": "left", "unit": "s", "reverse": False},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "legend": {"show": True},
            "filterValues": {"le": 1e-9},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "cellValues": {"unit": "short"},
        },
    }


def bargauge(title: str, description: str, expr: str, legend: str, *, unit: str) -> Panel:
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": [target(expr, legend, "A", instant=True)],
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "color": {"mode": "thresholds"},
                                     "thresholds": _thresholds([("orange", None)])},
                        "overrides": []},
        "options": {
            "displayMode": "gradient",
            "orientation": "horizontal",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
            "minVizHeight": 16,
            "minVizWidth": 8,
            "maxVizHeight": 300,
        },
    }


def table(title: str, description: str, expr: str, *, value_title: str, unit: str,
          label_columns: list[str], links: list[dict[str, Any]]) -> Panel:
    """An instant query shown as one row per label set, with trace links on the rows."""
    keep = {name: index for index, name in enumerate([*label_columns, "Value"])}
    rename = {"Value": value_title}
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": [target(expr, "", "A", instant=True, fmt="table")],
        "fieldConfig": {
            "defaults": {"unit": unit, "links": links, "custom": {"align": "auto",
                                                                  "cellOptions": {"type": "auto"}}},
            "overrides": [
                {"matcher": {"id": "byName", "options": value_title},
                 "properties": [{"id": "custom.cellOptions",
                                 "value": {"type": "color-background", "mode": "gradient"}},
                                {"id": "color", "value": {"mode": "continuous-YlRd"}}]},
            ],
        },
        "options": {"showHeader": True, "cellHeight": "sm",
                    "sortBy": [{"displayName": value_title, "desc": True}],
                    "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
        "transformations": [
            {"id": "organize", "options": {
                "excludeByName": {"Time": True},
                "indexByName": keep,
                "renameByName": rename,
            }},
            {"id": "filterFieldsByName", "options": {"include": {
                "names": [*label_columns, value_title]}}},
        ],
    }


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def text(title: str, content: str) -> Panel:
    return {"type": "text", "title": title,
            "options": {"mode": "markdown", "content": content,
                        "code": {"language": "plaintext", "showLineNumbers": False,
                                 "showMiniMap": False}}}


def _thresholds(steps: list[tuple[str, float | None]] | None) -> dict[str, Any]:
    steps = steps or [("green", None)]
    return {"mode": "absolute",
            "steps": [{"color": color, "value": value} for color, value in steps]}


def trace_link(span_kind: str) -> dict[str, Any]:
    """A data link opening Grafana Explore on the trace store with the spans of one subject.

    Span names carry the bare qualname (``async with Pool``) while the metrics' subject is
    module-qualified, so the search is by the spans' ``asyncdiag.subject`` attribute (a Jaeger
    tag), which equals the metrics' label exactly."""
    pane = {
        "traces": {
            "datasource": "@DS@",
            "queries": [{
                "refId": "A",
                "datasource": {"type": "jaeger", "uid": "@DS@"},
                "queryType": "search",
                "service": "@JOB@",
                "tags": 'asyncdiag.subject="@SUBJECT@"',
                "limit": 20,
            }],
            "range": {"from": "@FROM@", "to": "@TO@"},
        }
    }
    encoded = urllib.parse.quote(json.dumps(pane, separators=(",", ":")), safe="")
    for token, variable in (("@DS@", "${DS_TRACES}"), ("@JOB@", "${job:percentencode}"),
                            ("@SUBJECT@", "${__data.fields.asyncdiag_subject:percentencode}"),
                            ("@FROM@", "${__from}"), ("@TO@", "${__to}")):
        encoded = encoded.replace(urllib.parse.quote(token, safe=""), variable)
    return {"title": f"Traces of this subject ('{span_kind}' spans in Jaeger)",
            "targetBlank": False, "url": f"/explore?schemaVersion=1&orgId=1&panes={encoded}"}


# -- template variables ---------------------------------------------------------------------


def datasource_var(name: str, label: str, plugin: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "datasource", "query": plugin,
            "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [],
            "refresh": 1, "regex": "", "skipUrlSync": False}


def query_var(name: str, label: str, query: str, *, multi: bool) -> dict[str, Any]:
    var: dict[str, Any] = {
        "name": name, "label": label, "type": "query", "datasource": PROM,
        "definition": query,
        "query": {"qryType": 1, "query": query,
                  "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {}, "hide": 0, "options": [], "refresh": 2, "regex": "", "sort": 1,
        "skipUrlSync": False, "includeAll": multi, "multi": multi,
    }
    if multi:
        # "All" as a regex rather than the list of current values: new subjects appear
        # without a dashboard reload and the query stays short.
        var["allValue"] = ".*"
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return var


JOB_VAR = query_var("job", "Service (job)",
                    'label_values({__name__=~"asyncdiag_.+"}, job)', multi=False)
SUBJECT_VAR = query_var(
    "asyncdiag_subject", "Subject",
    'label_values({__name__=~"asyncdiag_.+", job="$job"}, asyncdiag_subject)', multi=True)
KIND_VAR = query_var("kind", "Finding kind",
                     'label_values(asyncdiag_findings_total{job="$job"}, kind)', multi=True)


# -- layout ---------------------------------------------------------------------------------


def layout(panels: list[tuple[Panel, int, int]]) -> list[Panel]:
    """Places ``(panel, width, height)`` left to right, wrapping at 24 columns; rows span
    the full width. Ids follow the order."""
    placed: list[Panel] = []
    x = y = line_height = 0
    for number, (panel, width, height) in enumerate(panels, start=1):
        if panel["type"] == "row":
            if x:
                y += line_height
            panel = {**panel, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
            y += 1
            x = line_height = 0
        else:
            if x + width > 24:
                y += line_height
                x = line_height = 0
            panel = {**panel, "gridPos": {"h": height, "w": width, "x": x, "y": y}}
            x += width
            line_height = max(line_height, height)
        placed.append({"id": number, **panel})
    return placed


def dashboard(uid: str, title: str, description: str, panels: list[tuple[Panel, int, int]],
              variables: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"asDropdown": False, "icon": "external link", "includeVars": True,
                   "keepTime": True, "tags": ["asyncdiag"], "targetBlank": False,
                   "title": "asyncdiag dashboards", "tooltip": "", "type": "dashboards",
                   "url": ""}],
        "panels": layout(panels),
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["asyncdiag", "asyncio", "opentelemetry"],
        "templating": {"list": variables},
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# -- the dashboards -------------------------------------------------------------------------


def loop_health() -> dict[str, Any]:
    lag = "asyncdiag_loop_lag_seconds_bucket"
    slow = "asyncdiag_loop_slow_callback_duration_seconds"
    panels: list[tuple[Panel, int, int]] = [
        (row("Event loop lag"), 24, 1),
        (timeseries(
            "Loop lag p50 / p95 / p99",
            "How late the loop ran asyncdiag's heartbeat callback: the time every ready "
            "callback waits behind whatever is running. Sustained lag means some step does "
            "blocking work or CPU-heavy work without yielding.",
            quantiles(lag, JOB, "", "lag "), unit="s",
            thresholds=[("transparent", None), ("orange", 0.05), ("red", 0.1)]), 16, 8),
        (stat("Loop lag p99 (last interval)",
              "p99 of the loop lag over the last rate interval. Alert "
              "AsyncdiagLoopLagHigh fires above 100 ms for 5 minutes.",
              f"histogram_quantile(0.99, sum by (le) (rate({lag}{{{JOB}}}[$__rate_interval])))",
              unit="s", thresholds=[("green", None), ("orange", 0.05), ("red", 0.1)]), 8, 8),
        (heatmap("Loop lag distribution",
                 "Heartbeats per lag bucket per interval. A healthy loop is a dark band at "
                 "the bottom; stalls show as cells high up.", lag, JOB), 24, 8),
        (row("Slow callbacks and blocked loop"), 24, 1),
        (timeseries(
            "Slow callbacks per second",
            "Loop steps (a callback or one step of a task) that ran longer than "
            "slow_callback_duration (ASYNCDIAG_SLOW_CALLBACK_MS) without yielding. Each one "
            "is also a slow_callback finding naming the task and the line.",
            [target(f"sum(rate({slow}_count{{{JOB}}}[$__rate_interval]))", "slow callbacks/s")],
            unit="ops"), 8, 8),
        (timeseries(
            "Slow callback duration",
            "How long the slow steps ran: p50 / p99 from the histogram, and the mean.",
            [*quantiles(f"{slow}_bucket", JOB, "", "duration ")[::2],
             target(f"sum(rate({slow}_sum{{{JOB}}}[$__rate_interval])) / "
                    f"sum(rate({slow}_count{{{JOB}}}[$__rate_interval]))", "mean", "D")],
            unit="s"), 8, 8),
        (stat("Blocked-loop findings (time range)",
              "Times the watchdog thread saw the loop stuck longer than the blocked threshold "
              "(ASYNCDIAG_BLOCKED_MS) while it was still stuck. The finding carries the loop "
              "thread's stack at that moment (log line and span event).",
              f'sum(increase(asyncdiag_findings_total{{{JOB}, kind="loop_blocked"}}[$__range]))',
              unit="short", no_value="0", thresholds=[("green", None), ("red", 0.5)]), 8, 8),
        (timeseries(
            "Blocked-loop and slow-callback findings per minute",
            "Rate of the two loop findings. loop_blocked is seen live by a watchdog; "
            "slow_callback is reported when the step finally returns.",
            [target('60 * sum by (kind) (rate(asyncdiag_findings_total'
                    f'{{{JOB}, kind=~"loop_blocked|slow_callback"}}[$__rate_interval]))',
                    "{{kind}}")],
            unit="short", bars=True), 24, 7),
        (row("Tasks"), 24, 1),
        (timeseries(
            "Pending tasks",
            "Tasks not yet done on the monitored event loops. A line that only grows is a "
            "task leak (tasks created and never awaited, cancelled or finished).",
            [target(f"sum(asyncdiag_loop_tasks{{{JOB}}})", "pending tasks")], unit="short"),
         16, 8),
        (stat("Pending tasks now", "Current number of tasks not yet done.",
              f"sum(asyncdiag_loop_tasks{{{JOB}}})", unit="short"), 8, 8),
    ]
    return dashboard(
        "asyncdiag-loop-health", "asyncdiag / Loop health",
        "Event loop responsiveness measured by asyncdiag: lag, slow callbacks, "
        "blocked-loop findings and pending tasks.",
        panels, [datasource_var("DS_PROMETHEUS", "Prometheus", "prometheus"), JOB_VAR])


def context_iterators() -> dict[str, Any]:
    enter = "asyncdiag_context_enter_duration_seconds"
    exit_ = "asyncdiag_context_exit_duration_seconds"
    nxt = "asyncdiag_iterator_next_duration_seconds"
    sel = f"{JOB}, {SUBJECT}"
    panels: list[tuple[Panel, int, int]] = [
        (row("Async context managers"), 24, 1),
        (timeseries(
            "__aenter__ latency p50 / p95 / p99 by subject",
            "Time spent in __aenter__ of each instrumented async context manager "
            "(connection checkout, lock acquisition, transaction begin...).",
            quantiles(f"{enter}_bucket", sel, "asyncdiag_subject", ""), unit="s"), 12, 9),
        (timeseries(
            "__aexit__ latency p50 / p95 / p99 by subject",
            "Time spent in __aexit__ (teardown). Teardown slower than "
            "ASYNCDIAG_SLOW_TEARDOWN_MS is also a slow_teardown finding.",
            quantiles(f"{exit_}_bucket", sel, "asyncdiag_subject", ""), unit="s"), 12, 9),
        (timeseries(
            "Exits per second by outcome",
            "How async with blocks end: ok, error (an exception came out), suppressed "
            "(__aexit__ returned true and swallowed the exception), cancelled.",
            [target(f"sum by (asyncdiag_outcome) (rate({exit_}_count{{{sel}}}"
                    "[$__rate_interval]))", "{{asyncdiag_outcome}}")],
            unit="ops", stack=True), 8, 8),
        (timeseries(
            "Error / suppressed / cancelled exits by subject",
            "Only the problem outcomes, per context manager. 'suppressed' is the "
            "swallowed_exception mistake; 'cancelled' exits that did not re-raise are "
            "swallowed_cancellation findings.",
            [target(f"sum by (asyncdiag_subject, asyncdiag_outcome) (rate({exit_}_count"
                    f"{{{sel}, {PROBLEM_OUTCOMES}}}[$__rate_interval]))",
                    "{{asyncdiag_subject}} {{asyncdiag_outcome}}")],
            unit="ops", bars=True), 8, 8),
        (timeseries(
            "Entries per second by subject",
            "async with blocks entered per second, per context manager.",
            [target(f"sum by (asyncdiag_subject) (rate({enter}_count{{{sel}}}"
                    "[$__rate_interval]))", "{{asyncdiag_subject}}")],
            unit="ops"), 8, 8),
        (row("Async iterators and generators"), 24, 1),
        (timeseries(
            "Yields per second by iterator",
            "Items produced by each instrumented async iterator / async generator.",
            [target(f"sum by (asyncdiag_subject) (rate(asyncdiag_iterator_yields_total"
                    f"{{{sel}}}[$__rate_interval]))", "{{asyncdiag_subject}}")],
            unit="ops"), 12, 8),
        (timeseries(
            "__anext__ latency p50 / p95 / p99 by iterator",
            "Time each __anext__ took: the wait for the next item (page fetch, queue get...).",
            quantiles(f"{nxt}_bucket", sel, "asyncdiag_subject", ""), unit="s"), 12, 8),
        (timeseries(
            "Active async generators",
            "Async generators started and not yet finished, closed or collected. A line "
            "that only grows means generators are abandoned and kept alive.",
            [target(f"sum(asyncdiag_asyncgen_active{{{JOB}}})", "active generators")],
            unit="short"), 8, 8),
        (timeseries(
            "Orphaned async generators",
            "Generators garbage-collected unfinished and never closed (no aclose(), no "
            "aclosing()): their finally blocks ran late, outside any task. Each is an "
            "orphaned_asyncgen finding pointing at the line where iteration started.",
            [target('sum(increase(asyncdiag_findings_total'
                    f'{{{JOB}, kind="orphaned_asyncgen"}}[$__rate_interval]))', "orphaned")],
            unit="short", bars=True), 8, 8),
        (stat("Orphaned async generators (time range)",
              "orphaned_asyncgen findings in the dashboard's time range.",
              'sum(increase(asyncdiag_findings_total'
              f'{{{JOB}, kind="orphaned_asyncgen"}}[$__range]))',
              unit="short", no_value="0", thresholds=[("green", None), ("orange", 0.5)]), 8, 8),
    ]
    return dashboard(
        "asyncdiag-context-iterators", "asyncdiag / Context managers and iterators",
        "Latency and outcomes of instrumented async context managers, async iterators and "
        "async generators (asyncdiag.instrument / ASYNCDIAG_INSTRUMENT).",
        panels, [datasource_var("DS_PROMETHEUS", "Prometheus", "prometheus"), JOB_VAR,
                 SUBJECT_VAR])


def findings() -> dict[str, Any]:
    kind_sel = f'{JOB}, kind=~"$kind"'
    exit_ = "asyncdiag_context_exit_duration_seconds"
    nxt = "asyncdiag_iterator_next_duration_seconds"
    sel = f"{JOB}, {SUBJECT}"
    panels: list[tuple[Panel, int, int]] = [
        (stat("Findings (time range)",
              "All findings of the selected kinds in the time range. Repeats of one mistake "
              "at one place are folded in the log, but every occurrence counts here.",
              f"sum(increase(asyncdiag_findings_total{{{kind_sel}}}[$__range]))",
              unit="short", no_value="0", thresholds=[("green", None), ("orange", 0.5)]), 6, 8),
        (bargauge("Findings by kind (time range)",
                  "Which mistakes this service makes, most frequent first.",
                  "sort_desc(sum by (kind) (increase(asyncdiag_findings_total"
                  f"{{{kind_sel}}}[$__range])))", "{{kind}}", unit="short"), 18, 8),
        (timeseries(
            "Findings per minute by kind",
            "Rate of every finding kind. The log line (logger 'asyncdiag') and the span event "
            "'asyncdiag.finding' of each finding carry file, line, task and stack.",
            [target("60 * sum by (kind) (rate(asyncdiag_findings_total"
                    f"{{{kind_sel}}}[$__rate_interval]))", "{{kind}}")],
            unit="short", bars=True, stack=True), 24, 8),
        (row("Top subjects (click a row for its traces)"), 24, 1),
        (table("Context managers with the most problem exits",
               "Instrumented context managers ranked by error, suppressed and cancelled "
               "exits in the time range (the findings counter has only a kind label, so the "
               "subjects come from the outcome of each __aexit__). Click a row to open the "
               "'async with' spans of that subject in the trace store.",
               f"topk(10, sum by (asyncdiag_subject, asyncdiag_outcome) (increase({exit_}_count"
               f"{{{sel}, {PROBLEM_OUTCOMES}}}[$__range])) > 0)",
               value_title="exits", unit="short",
               label_columns=["asyncdiag_subject", "asyncdiag_outcome"],
               links=[trace_link("async with")]), 12, 9),
        (table("Slowest teardowns (p99 __aexit__)",
               "Context managers ranked by p99 __aexit__ time over the time range; slow "
               "teardowns block shutdown and hold resources. Click a row for its traces.",
               f"topk(10, histogram_quantile(0.99, sum by (le, asyncdiag_subject) "
               f"(rate({exit_}_bucket{{{sel}}}[$__range]))))",
               value_title="p99 exit", unit="s", label_columns=["asyncdiag_subject"],
               links=[trace_link("async with")]), 12, 9),
        (table("Slowest iterators (p99 __anext__)",
               "Async iterators and generators ranked by p99 __anext__ time over the time "
               "range. Click a row for its 'async for' spans.",
               f"topk(10, histogram_quantile(0.99, sum by (le, asyncdiag_subject) "
               f"(rate({nxt}_bucket{{{sel}}}[$__range]))))",
               value_title="p99 next", unit="s", label_columns=["asyncdiag_subject"],
               links=[trace_link("async for")]), 12, 9),
        (_traces_panel(), 12, 9),
    ]
    return dashboard(
        "asyncdiag-findings", "asyncdiag / Findings",
        "Every asyncio mistake asyncdiag found (finding kinds of the contract), the subjects "
        "behind them, and links to their traces.",
        panels, [datasource_var("DS_PROMETHEUS", "Prometheus", "prometheus"),
                 datasource_var("DS_TRACES", "Traces", "jaeger"), JOB_VAR, KIND_VAR,
                 SUBJECT_VAR])


def _traces_panel() -> Panel:
    return {
        "type": "table",
        "title": "Recent traces of $job",
        "description": "Latest traces of the service in the trace store (Jaeger). A finding "
                       "made inside an instrumented block is an 'asyncdiag.finding' event on "
                       "its span. Click a trace ID to open it.",
        "datasource": TRACES,
        "targets": [{"datasource": TRACES, "queryType": "search", "service": "$job",
                     "limit": 20, "refId": "A"}],
        "fieldConfig": {"defaults": {"custom": {"align": "auto",
                                                "cellOptions": {"type": "auto"}}},
                        "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm",
                    "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
    }


DASHBOARDS = {
    "asyncdiag-loop-health.json": loop_health,
    "asyncdiag-context-iterators.json": context_iterators,
    "asyncdiag-findings.json": findings,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    for filename, build in DASHBOARDS.items():
        (HERE / filename).write_text(render(build), encoding="utf-8")
        print(f"wrote dashboards/{filename}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

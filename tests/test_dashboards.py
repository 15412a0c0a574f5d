"""Static checks of the Grafana dashboards, alert rules and the docker-compose stack.

Docker cannot run here, so everything that can be checked without it is: the dashboards are
what ``dashboards/generate.py`` writes; every PromQL query (panels, template variables,
alert rules) names only series and labels asyncdiag emits according to ``asyncdiag._names``;
the YAML files parse and reference each other consistently; ``promtool`` accepts the
Prometheus config and rules and the rules' unit tests pass. The queries are run for real
against Prometheus in ``test_dashboards_prometheus.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from asyncdiag import _names

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "asyncdiag.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "asyncdiag.rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"

# Every series name asyncdiag emits, as Prometheus shows it.
KNOWN_SERIES = frozenset(s for m in _names.METRICS for s in m.prometheus_series)
# Labels a query may use: the metrics' attributes (sanitised as the exporters do), the
# labels Prometheus or the exporters add, and the histogram bucket label.
KNOWN_LABELS = frozenset(
    {re.sub(r"[^a-zA-Z0-9_]", "_", a) for m in _names.METRICS for a in m.attributes}
    | {"job", "instance", "le", "__name__"}
)


# -- where the queries are --------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from."""

    source: str  # "dashboard" | "variable" | "rule"
    where: str  # human-readable location for failure messages
    expr: str
    instant: bool = False
    dashboard: str = ""
    panel: str = ""


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def is_prometheus(datasource: Any) -> bool:
    return isinstance(datasource, dict) and datasource.get("type") == "prometheus"


def dashboard_queries() -> list[Query]:
    queries = []
    for path in dashboard_files():
        board = load_dashboard(path)
        for panel in iter_panels(board):
            for target in panel.get("targets", []):
                if not is_prometheus(target.get("datasource", panel.get("datasource"))):
                    continue
                queries.append(Query(
                    "dashboard",
                    f"{path.name} panel {panel['id']} '{panel['title']}' ref {target['refId']}",
                    target["expr"], instant=bool(target.get("instant")),
                    dashboard=path.name, panel=panel["title"],
                ))
    return queries


LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>[a-zA-Z_]\w*)\)$")


def variable_queries() -> list[tuple[str, str, str | None, str]]:
    """``(where, label, match selector or None, raw query)`` of every query variable."""
    out = []
    for path in dashboard_files():
        for var in load_dashboard(path)["templating"]["list"]:
            if var["type"] != "query":
                continue
            raw = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = LABEL_VALUES.match(raw)
            assert found, f"{path.name} variable {var['name']}: not label_values(...): {raw}"
            out.append((f"{path.name} variable ${var['name']}", found["label"],
                        found["match"], raw))
    return out


def rule_queries() -> list[Query]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [Query("rule", f"alert {rule['alert']}", rule["expr"].strip())
            for group in rules["groups"] for rule in group["rules"]]


def all_queries() -> list[Query]:
    variables = [Query("variable", where, match) for where, _, match, _ in variable_queries()
                 if match]
    return [*dashboard_queries(), *variables, *rule_queries()]


# -- a small PromQL tokenizer ------------------------------------------------------------------

KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2", "start", "end",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE)
_RANGE = re.compile(r"\[[^\]]*\]")
_TOKEN = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
    r"(?:ms|[smhdwy])*)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"|(?P<variable>\$\{?[a-zA-Z_][a-zA-Z0-9_]*(?::[a-z]+)?\}?)"
    r"|(?P<other>\S)"
)


@dataclass
class Parsed:
    metrics: set[str]
    labels: set[str]
    matchers: list[tuple[str, str, str]]  # (label, operator, unquoted value)


def parse_promql(expr: str) -> Parsed:
    """Metric names, label names and label matchers of a PromQL expression.

    A metric name is an identifier that is not followed by ``(`` (a function or an
    aggregation) and is not a keyword; label names come from ``{...}`` matchers and from
    ``by``/``without``/``on``/``ignoring``/``group_*`` lists, which are removed before
    looking for metric names, as are strings and ``[...]`` ranges.
    """
    labels: set[str] = set()
    matchers: list[tuple[str, str, str]] = []
    for block in _MATCHERS.findall(expr):
        rest = _MATCHER.sub("", block)
        assert re.fullmatch(r"[\s,]*", rest), f"unparsed label matchers {rest!r} in {expr}"
        for label, op, value in _MATCHER.findall(block):
            labels.add(label)
            matchers.append((label, op, json.loads(value)))
    stripped = _MATCHERS.sub(" ", expr)
    stripped = _STRING.sub(" ", stripped)
    for _, names in _GROUPING.findall(stripped):
        labels.update(n.strip() for n in names.split(",") if n.strip())
    stripped = _GROUPING.sub(" ", stripped)
    stripped = _RANGE.sub(" ", stripped)
    metrics: set[str] = set()
    tokens = list(_TOKEN.finditer(stripped))
    for index, token in enumerate(tokens):
        name = token["ident"]
        if not name or name.lower() in KEYWORDS:
            continue
        following = tokens[index + 1]["other"] if index + 1 < len(tokens) else None
        if following == "(":
            continue
        metrics.add(name)
    return Parsed(metrics, labels, matchers)


def metric_names_of(parsed: Parsed) -> set[str]:
    """Names selected directly and through ``{__name__=~"..."}``."""
    names = set(parsed.metrics)
    for label, op, value in parsed.matchers:
        if label == "__name__":
            pattern = re.compile(value)
            matching = {s for s in KNOWN_SERIES if pattern.fullmatch(s)}
            assert op in ("=", "=~"), f"negative __name__ matcher {value!r}"
            # A __name__ regex must select asyncdiag series and nothing else we know of.
            names |= matching or {f"<nothing matches {value}>"}
    return names


def problems_of(query: Query) -> list[str]:
    parsed = parse_promql(query.expr)
    problems = [f"unknown metric {name!r}"
                for name in sorted(metric_names_of(parsed) - KNOWN_SERIES)]
    problems += [f"unknown label {label!r}" for label in sorted(parsed.labels - KNOWN_LABELS)]
    # Literal values of the two closed label sets: "a|b" alternatives or a single value.
    closed = {_names.ATTR_KIND: ("finding kind", _names.FINDING_KINDS),
              "asyncdiag_outcome": ("outcome", _names.OUTCOMES)}
    for label, _, value in parsed.matchers:
        if label in closed and "$" not in value:
            what, allowed = closed[label]
            problems += [f"unknown {what} {v!r}" for v in value.split("|") if v not in allowed]
    return problems


# -- the tokenizer itself ------------------------------------------------------------------------


def test_tokenizer_finds_metric_names_and_labels() -> None:
    parsed = parse_promql(
        'histogram_quantile(0.99, sum by (le, asyncdiag_subject) (rate('
        'asyncdiag_context_exit_duration_seconds_bucket{job="$job", '
        'asyncdiag_outcome=~"error|suppressed"}[$__rate_interval] offset 5m))) > 1e-3 '
        'and on (job) asyncdiag_loop_tasks unless bogus_series'
    )
    assert parsed.metrics == {"asyncdiag_context_exit_duration_seconds_bucket",
                              "asyncdiag_loop_tasks", "bogus_series"}
    assert parsed.labels == {"le", "asyncdiag_subject", "job", "asyncdiag_outcome"}
    assert ("asyncdiag_outcome", "=~", "error|suppressed") in parsed.matchers


@pytest.mark.parametrize("expr, problem", [
    ("rate(asyncdiag_loop_lag_bucket[5m])", "unknown metric 'asyncdiag_loop_lag_bucket'"),
    ("asyncdiag_findings", "unknown metric 'asyncdiag_findings'"),
    ('sum by (subject) (asyncdiag_iterator_yields_total)', "unknown label 'subject'"),
    ('asyncdiag_findings_total{kind="blocked_loop"}', "unknown finding kind 'blocked_loop'"),
    ('asyncdiag_context_exit_duration_seconds_count{asyncdiag_outcome=~"ok|failed"}',
     "unknown outcome 'failed'"),
    ('label_values({__name__=~"myapp_.+"}, job)', "unknown metric '<nothing matches myapp_.+>'"),
])
def test_checker_rejects_names_asyncdiag_does_not_emit(expr: str, problem: str) -> None:
    if expr.startswith("label_values"):
        expr = expr[len("label_values("):].rsplit(",", 1)[0]
    assert problem in problems_of(Query("rule", "example", expr))


# -- dashboards ---------------------------------------------------------------------------------


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("asyncdiag_dashboards_generate",
                                                  DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_files_are_what_the_generator_writes() -> None:
    generator = _generator()
    assert sorted(generator.DASHBOARDS) == [p.name for p in dashboard_files()]
    for filename, build in generator.DASHBOARDS.items():
        committed = (DASHBOARDS / filename).read_text(encoding="utf-8")
        assert committed == generator.render(build), (
            f"dashboards/{filename} is stale: run python dashboards/generate.py")


def test_three_dashboards_with_the_promised_content() -> None:
    titles = {load_dashboard(p)["title"]: p for p in dashboard_files()}
    assert set(titles) >= {"asyncdiag / Loop health",
                           "asyncdiag / Context managers and iterators",
                           "asyncdiag / Findings"}
    exprs = {name: " ".join(q.expr for q in dashboard_queries() if q.dashboard == path.name)
             for name, path in titles.items()}
    loop = exprs["asyncdiag / Loop health"]
    for needle in ("asyncdiag_loop_lag_seconds_bucket", "asyncdiag_loop_slow_callback_duration",
                   'kind="loop_blocked"', "asyncdiag_loop_tasks"):
        assert needle in loop
    cm = exprs["asyncdiag / Context managers and iterators"]
    for needle in ("asyncdiag_context_enter_duration_seconds_bucket",
                   "asyncdiag_context_exit_duration_seconds_bucket", "histogram_quantile(0.5,",
                   "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                   "error|suppressed|cancelled",
                   "asyncdiag_iterator_yields_total", "asyncdiag_iterator_next_duration_seconds",
                   "asyncdiag_asyncgen_active", 'kind="orphaned_asyncgen"'):
        assert needle in cm
    found = exprs["asyncdiag / Findings"]
    assert "sum by (kind)" in found and "topk(" in found
    findings_board = load_dashboard(titles["asyncdiag / Findings"])
    links = [link["url"] for panel in iter_panels(findings_board)
             for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])]
    assert links
    for url in links:
        pane = json.loads(unquote(url.split("panes=", 1)[1]))
        (query,) = pane["traces"]["queries"]
        assert query["datasource"] == {"type": "jaeger", "uid": "${DS_TRACES}"}
        assert query["service"] == "${job:percentencode}"
        # Span names carry the bare qualname; the subject label equals the span attribute.
        assert query["tags"] == (
            'asyncdiag.subject="${__data.fields.asyncdiag_subject:percentencode}"')
        assert pane["traces"]["range"] == {"from": "${__from}", "to": "${__to}"}
    assert any(t.get("datasource", {}).get("type") == "jaeger"
               for panel in iter_panels(findings_board) for t in panel.get("targets", []))


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    board = load_dashboard(path)
    assert board["schemaVersion"] >= 39
    assert board["uid"] and len(board["uid"]) <= 40
    assert board["id"] is None  # provisioned and importable without clashing ids
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["type"] == "query"
    uses_subject = any("asyncdiag_subject" in q.expr for q in dashboard_queries()
                       if q.dashboard == path.name)
    if uses_subject:
        subject = variables["asyncdiag_subject"]
        assert subject["multi"] and subject["includeAll"] and subject["allValue"] == ".*"
    ids = [p["id"] for p in iter_panels(board)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in iter_panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel
        if panel["type"] == "text":
            continue
        datasource = panel["datasource"]
        assert datasource["uid"] in ("${DS_PROMETHEUS}", "${DS_TRACES}"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource
            if is_prometheus(datasource):
                assert "$job" in target["expr"], f"{panel['title']}: not filtered by service"
                used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
                builtin = {"__rate_interval", "__interval", "__range"}
                assert used <= set(variables) | builtin, f"{panel['title']}: {used}"


@pytest.mark.parametrize("query", all_queries(), ids=lambda q: q.where)
def test_every_query_uses_only_names_asyncdiag_emits(query: Query) -> None:
    assert problems_of(query) == [], f"{query.where}: {query.expr}"


def test_every_emitted_metric_appears_on_a_dashboard() -> None:
    used = set().union(*(metric_names_of(parse_promql(q.expr)) for q in dashboard_queries()))
    missing = [m.name for m in _names.METRICS if not set(m.prometheus_series) & used]
    assert missing == []


# -- alert rules and Prometheus config ------------------------------------------------------------


def test_alert_rules_cover_the_promised_alerts() -> None:
    rules = {q.where: q.expr for q in rule_queries()}
    assert 'kind="loop_blocked"' in rules["alert AsyncdiagLoopBlocked"]
    assert "histogram_quantile(0.99" in rules["alert AsyncdiagLoopLagHigh"]
    assert 'kind="orphaned_asyncgen"' in rules["alert AsyncdiagOrphanedAsyncgensRising"]
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for rule in (r for g in data["groups"] for r in g["rules"]):
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: apt-get install -y prometheus")


def _promtool(*args: str, cwd: Path) -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    _promtool("check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_CONFIG.parent)
    _promtool("check", "rules", str(RULES), cwd=ROOT)


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    _promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)


# -- docker-compose stack -------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's ``./...`` bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            mounts[container] = (ROOT / host).resolve()
    return mounts


def _port_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def test_compose_stack_is_complete_and_pinned() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert set(services) >= {"demo", "otel-collector", "prometheus", "jaeger", "grafana"}
    for name, service in services.items():
        if "build" in service:
            continue
        repo, _, tag = service["image"].rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), (name, tag)
        for container, host in _bind_mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) is missing"
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")


def test_compose_demo_service() -> None:
    compose = _yaml(COMPOSE)
    demo = compose["services"]["demo"]
    dockerfile = ROOT / demo["build"]["context"] / demo["build"]["dockerfile"]
    assert dockerfile.exists()
    assert demo["command"] == ["asyncdiag", "demo", "--rounds", "0"]
    env = demo["environment"]
    assert env["ASYNCDIAG_ENABLED"] == "1"
    host, port = _port_of(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host == "otel-collector"
    collector = _yaml(DEPLOY / "otel-collector" / "config.yaml")
    grpc = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert _port_of(grpc)[1] == port == 4317
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    # The agent is installed at interpreter start, before the demo's setdefault of its short
    # thresholds could matter; compose gives the same values, so the demo behaves as
    # `asyncdiag demo` does on a laptop.
    from asyncdiag import _demo

    assert {k: env[k] for k in _demo._DEMO_DEFAULTS} == _demo._DEMO_DEFAULTS
    # Activation is the environment variable only: nothing in the image turns it on.
    text = dockerfile.read_text(encoding="utf-8")
    assert "ASYNCDIAG_ENABLED" not in re.sub(r"(?m)^#.*$", "", text)


def test_dockerfile_copies_what_the_build_needs() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    # The wheel is built where there is a compiler (the C extension), and run on slim: the same
    # Python release in both stages.
    stages = re.findall(r"(?m)^FROM python:(3\.\d+\.\d+)(-slim)?-bookworm", text)
    assert [slim for _, slim in stages] == ["", "-slim"], stages
    assert stages[0][0] == stages[1][0], stages
    assert "COPY --from=build /wheels /wheels" in text
    for line in re.findall(r"(?m)^COPY (?!--from)(.+)$", text):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for needed in ("src/", "pyproject.toml", "setup.py", "MANIFEST.in"):
        assert f"!{needed}\n" in ignore, needed
    # The wheel must carry the .pth that makes ASYNCDIAG_ENABLED=1 work in the container.
    setup_py = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert 'PTH = "asyncdiag_autostart.pth"' in setup_py
    assert 'CMD ["asyncdiag", "demo", "--rounds", "0"]' in text


def test_collector_config_shape() -> None:
    config = _yaml(DEPLOY / "otel-collector" / "config.yaml")
    compose = _yaml(COMPOSE)
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"metrics", "traces"}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name}: {kind} {component} not defined"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    (trace_exporter,) = pipelines["traces"]["exporters"]
    assert trace_exporter.split("/")[0] in ("otlp", "otlphttp")
    host, _ = _port_of(config["exporters"][trace_exporter]["endpoint"])
    assert host in compose["services"]
    # What Prometheus scrapes is the collector's Prometheus exporter.
    _, exporter_port = _port_of(config["exporters"]["prometheus"]["endpoint"])
    prometheus = _yaml(PROMETHEUS_CONFIG)
    (scrape,) = prometheus["scrape_configs"]
    assert scrape["honor_labels"] is True  # keeps job=<service.name> from the exporter
    (target,) = scrape["static_configs"][0]["targets"]
    assert _port_of(target) == ("otel-collector", exporter_port)
    assert "rules/*.rules.yml" in prometheus["rule_files"]
    assert RULES.match("*.rules.yml")


def test_grafana_provisioning_matches_the_stack() -> None:
    compose = _yaml(COMPOSE)
    grafana = compose["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["/etc/grafana/provisioning/datasources"] == provisioning / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == provisioning / "dashboards"
    (provider_file,) = (provisioning / "dashboards").glob("*.yaml")
    (provider,) = _yaml(provider_file)["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == DASHBOARDS
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARDS / Path(home).name).exists()
    (datasource_file,) = (provisioning / "datasources").glob("*.yaml")
    datasources = {d["type"]: d for d in _yaml(datasource_file)["datasources"]}
    assert set(datasources) == {"prometheus", "jaeger"}
    assert _port_of(datasources["prometheus"]["url"]) == ("prometheus", 9090)
    assert _port_of(datasources["jaeger"]["url"]) == ("jaeger", 16686)
    for name in ("prometheus", "jaeger"):
        assert name in compose["services"]
    # Each dashboard datasource variable finds a provisioned datasource of its plugin type.
    for path in dashboard_files():
        for var in load_dashboard(path)["templating"]["list"]:
            if var["type"] == "datasource":
                assert var["query"] in datasources, (path.name, var["name"])

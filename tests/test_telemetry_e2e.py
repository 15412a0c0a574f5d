"""End to end over real sockets on 127.0.0.1: a program configured by environment variables
only exports asyncdiag's spans and every metric of the contract to a real OTLP receiver (gRPC
and HTTP), through its own providers or the application's, and a dead or hung collector costs
it nothing measurable. The Prometheus exporter serves the contract's series names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from asyncdiag import _names
from asyncdiag._telemetry import SHUTDOWN_TIMEOUT_SECONDS
from otlp_receiver import HangingCollector, OtlpReceiver, attributes, closed_port, data_points

PROBE = Path(__file__).with_name("telemetry_probe.py")
SECRET_PART = "s3cr3t-probe"
SERVICE = "asyncdiag-probe"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ASYNCDIAG_", "OTEL_", "PROBE_", "PYTEST_"))}
    env.update(extra)
    return env


def run_probe(mode: str, env: dict[str, str], timeout: float = 60) -> tuple[dict[str, Any], str,
                                                                             float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(PROBE), mode], env=env, capture_output=True,
                          text=True, timeout=timeout)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.splitlines()[0])
    return facts, proc.stderr, wall


def otlp_env(endpoint: str, protocol: str = "grpc", **extra: str) -> dict[str, str]:
    return clean_env(
        ASYNCDIAG_ENABLED="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_EXPORTER_OTLP_HEADERS="x-probe-token=t0k3n",
        OTEL_SERVICE_NAME=SERVICE,
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,team=async",
        OTEL_METRIC_EXPORT_INTERVAL="200",
        OTEL_BSP_SCHEDULE_DELAY="100",
        **extra,
    )


def metric_by_name(receiver: OtlpReceiver) -> dict[str, Any]:
    return {name: receiver.latest(name) for name in receiver.metric_names()}


def assert_contract_metrics(receiver: OtlpReceiver) -> None:
    """Every metric of the contract arrived, with its unit, kind, attributes and buckets."""
    latest = metric_by_name(receiver)
    missing = [spec.name for spec in _names.METRICS if spec.name not in latest]
    assert not missing, f"metrics that never arrived: {missing}"
    kinds = {"histogram": "histogram", "counter": "sum", "up_down_counter": "sum",
             "observable_gauge": "gauge"}
    for spec in _names.METRICS:
        metric = latest[spec.name]
        assert metric.unit == spec.unit, spec.name
        assert metric.WhichOneof("data") == kinds[spec.instrument], spec.name
        if spec.instrument == "counter":
            assert metric.sum.is_monotonic, spec.name
        if spec.instrument == "up_down_counter":
            assert not metric.sum.is_monotonic, spec.name
        for point in data_points(metric):
            keys = set(attributes(point.attributes))
            assert keys <= set(spec.attributes), (spec.name, keys)
            if spec.instrument == "histogram":
                assert tuple(point.explicit_bounds) == _names.DURATION_BUCKETS, spec.name

    enter = data_points(latest[_names.CONTEXT_ENTER_DURATION.name])
    assert [attributes(p.attributes) for p in enter] == [{_names.ATTR_SUBJECT: "probe.Pool"}]
    assert enter[0].count == 50
    assert enter[0].sum == pytest.approx(sum(0.0001 * (i + 1) for i in range(50)))
    assert enter[0].min == pytest.approx(0.0001) and enter[0].max == pytest.approx(0.005)
    # 0.0001 .. 0.005 spread over the explicit buckets, not all in the first one.
    assert sum(1 for count in enter[0].bucket_counts if count) >= 4
    exits = {attributes(p.attributes)[_names.ATTR_OUTCOME]: p.count
             for p in data_points(latest[_names.CONTEXT_EXIT_DURATION.name])}
    assert exits == {"ok": 50, "error": 1}
    (yields,) = data_points(latest[_names.ITERATOR_YIELDS.name])
    assert yields.as_int == 5
    (active,) = data_points(latest[_names.ASYNCGEN_ACTIVE.name])
    assert active.as_int == 1
    (finding,) = data_points(latest[_names.FINDINGS.name])
    assert attributes(finding.attributes) == {_names.ATTR_KIND: _names.SLOW_TEARDOWN}
    assert finding.as_int == 1


def assert_spans(receiver: OtlpReceiver) -> None:
    spans = receiver.spans()
    with_name = [s for s in spans if s.name == _names.async_with_span_name("probe.Pool")]
    assert len(with_name) == 1, [s.name for s in spans]
    (event,) = [e for e in with_name[0].events if e.name == _names.FINDING_EVENT]
    assert attributes(event.attributes) == {
        _names.EVENT_ATTR_KIND: _names.SLOW_TEARDOWN,
        _names.EVENT_ATTR_SUBJECT: "probe.Pool",
        _names.EVENT_ATTR_MESSAGE: "probe.Pool.__aexit__ took 0.60 s",
        _names.EVENT_ATTR_LOCATION: "probe.py:42",
        _names.EVENT_ATTR_DURATION: 0.6,
    }
    assert len([s for s in spans if s.name == _names.async_for_span_name("probe.rows")]) == 20


def assert_no_secret(receiver: OtlpReceiver, stderr: str, facts: dict[str, Any]) -> None:
    assert receiver.raw, "nothing was received"
    assert not any(SECRET_PART.encode() in body for body in receiver.raw)
    assert SECRET_PART not in stderr
    assert SECRET_PART not in json.dumps(facts)


@pytest.mark.parametrize(("protocol", "loop"), [("grpc", "asyncio"), ("http/protobuf", "uvloop")])
def test_env_only_program_exports_spans_and_every_metric(protocol: str, loop: str) -> None:
    with OtlpReceiver() as receiver:
        endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
        facts, stderr, _ = run_probe("env", otlp_env(endpoint, protocol, PROBE_LOOP=loop))
        assert facts["own_pipeline"] is True
        # The final flush at exit delivered everything: nothing to wait for.
        assert_contract_metrics(receiver)
        assert_spans(receiver)
        assert receiver.transports == {"grpc" if protocol == "grpc" else "http"}
        assert all(h.get("x-probe-token") == "t0k3n" for h in receiver.headers)
        for resource in receiver.resources():
            assert resource["service.name"] == SERVICE
            assert resource["deployment.environment"] == "test"
            assert resource["team"] == "async"
        assert_no_secret(receiver, stderr, facts)


def test_sampler_and_signal_exporters_come_from_the_environment() -> None:
    with OtlpReceiver() as receiver:
        env = otlp_env(receiver.grpc_endpoint, OTEL_TRACES_SAMPLER="always_off")
        run_probe("env", env)
        assert receiver.spans() == []
        assert _names.FINDINGS.name in receiver.metric_names()
    with OtlpReceiver() as receiver:
        run_probe("env", otlp_env(receiver.grpc_endpoint, OTEL_METRICS_EXPORTER="none"))
        assert receiver.metric_requests == []
        assert receiver.spans()


def test_sdk_disabled_and_exporter_none_export_nothing() -> None:
    for extra in ({"OTEL_SDK_DISABLED": "true"}, {"ASYNCDIAG_EXPORTER": "none"}):
        with OtlpReceiver() as receiver:
            facts, _, _ = run_probe("env", otlp_env(receiver.grpc_endpoint, **extra))
            assert facts["own_pipeline"] is False
            assert receiver.raw == [], extra


@pytest.mark.parametrize("mode", ["app", "late"])
def test_application_providers_are_used_and_nothing_is_added(mode: str) -> None:
    """``app``: providers set before install; ``late``: set after the agent started."""
    with OtlpReceiver() as receiver:
        env = clean_env(PROBE_ENDPOINT=receiver.grpc_endpoint, OTEL_SERVICE_NAME=SERVICE)
        if mode == "late":
            env["ASYNCDIAG_ENABLED"] = "1"
        facts, stderr, _ = run_probe(mode, env)
        assert facts["own_pipeline"] is False
        assert_contract_metrics(receiver)
        assert_spans(receiver)
        resources = receiver.resources()
        assert resources and all(r.get("probe.app") == "own-providers" for r in resources)
        assert_no_secret(receiver, stderr, facts)


def test_collector_down_or_hanging_costs_the_program_nothing() -> None:
    spans = {"PROBE_SPANS": "3000", "PROBE_SLEEP": "0.5", "OTEL_BSP_MAX_QUEUE_SIZE": "256",
             "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64"}
    baseline, _, baseline_wall = run_probe(
        "env", otlp_env(f"http://127.0.0.1:{closed_port()}", ASYNCDIAG_EXPORTER="none",
                        **spans))
    down, down_err, down_wall = run_probe(
        "env", otlp_env(f"http://127.0.0.1:{closed_port()}", **spans))
    with HangingCollector() as hanging:
        hung, hung_err, hung_wall = run_probe("env", otlp_env(hanging.endpoint, **spans))
        assert hanging.connections >= 1
    for facts, err in ((down, down_err), (hung, hung_err)):
        assert facts["own_pipeline"] is True
        assert "Traceback" not in err
        # The program's own work: same time as with nothing exported (generous for a shared
        # 2-core machine; a blocking export would add seconds).
        assert facts["elapsed"] < baseline["elapsed"] * 1.5 + 0.5, (facts, baseline)
    # Refused connections: the final flush is one attempt, no backoff.
    assert down_wall < baseline_wall + 1.5, (down_wall, baseline_wall)
    # A collector that never answers: exit waits for the bounded flush, not the 10 s export
    # timeout or the SDK's 30 s shutdown.
    assert hung_wall < baseline_wall + SHUTDOWN_TIMEOUT_SECONDS + 2.5, (hung_wall, baseline_wall)
    assert "span(s) were dropped" in hung_err


def test_prometheus_endpoint_serves_the_contract_series() -> None:
    port = closed_port()
    env = clean_env(ASYNCDIAG_ENABLED="1", OTEL_METRICS_EXPORTER="prometheus",
                    OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
                    OTEL_EXPORTER_PROMETHEUS_PORT=str(port), OTEL_SERVICE_NAME=SERVICE)
    proc = subprocess.Popen([sys.executable, str(PROBE), "serve"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "READY"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        _, stderr = proc.communicate("", timeout=30)
    assert proc.returncode == 0, stderr
    series = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
              if line and not line.startswith("#")}
    for spec in _names.METRICS:
        missing = set(spec.prometheus_series) - series
        assert not missing, (spec.name, missing, sorted(s for s in series if "asyncdiag" in s))
    assert f'le="{_names.DURATION_BUCKETS[0]:g}"' in text or "le=\"1e-05\"" in text
    assert 'asyncdiag_subject="probe.Pool"' in text
    assert SECRET_PART not in text


INSTRUMENT = Path(sys.executable).with_name("opentelemetry-instrument")


@pytest.mark.skipif(not INSTRUMENT.exists(), reason="opentelemetry-distro not installed")
def test_opentelemetry_instrument_installs_the_agent_with_its_providers() -> None:
    with OtlpReceiver() as receiver:
        env = clean_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint,
            OTEL_SERVICE_NAME=SERVICE, OTEL_LOGS_EXPORTER="none",
            OTEL_METRIC_EXPORT_INTERVAL="200", OTEL_BSP_SCHEDULE_DELAY="100",
        )
        proc = subprocess.run([str(INSTRUMENT), sys.executable, str(PROBE), "env"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        facts = json.loads(proc.stdout.splitlines()[0])
        assert facts["preinstalled"] is True  # by the entry point, before the program ran
        assert facts["own_pipeline"] is False  # opentelemetry-instrument's providers
        assert_contract_metrics(receiver)
        assert_spans(receiver)
        # One resource: the SDK's configured by opentelemetry-instrument, nothing of ours.
        assert {r["service.name"] for r in receiver.resources()} == {SERVICE}

    env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = "flask, asyncdiag"
    env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    proc = subprocess.run([str(INSTRUMENT), sys.executable, str(PROBE), "env"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["preinstalled"] is False


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_no_argument_value_or_credential_is_recorded_anywhere(tmp_path: Path, loop: str) -> None:
    """The real detectors see every mistake committed with a credential in arguments,
    instance attributes, yielded items and exception messages; none of it is exported,
    logged by asyncdiag or kept in a finding."""
    log = tmp_path / "asyncdiag.log"
    with OtlpReceiver() as receiver:
        env = otlp_env(receiver.grpc_endpoint, PROBE_LOG=str(log), PROBE_LOOP=loop,
                       ASYNCDIAG_SLOW_CALLBACK_MS="50", ASYNCDIAG_SLOW_TEARDOWN_MS="100")
        proc = subprocess.run([sys.executable, str(PROBE), "secrets"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        facts = json.loads(proc.stdout.splitlines()[0])
    kinds = {line.split("]")[0].lstrip("[") for line in facts["findings"]}
    # The detectors really saw the mistakes (the check below would be empty otherwise).
    assert {_names.SWALLOWED_EXCEPTION, _names.ORPHANED_ASYNCGEN,
            _names.NEVER_AWAITED} <= kinds, kinds
    assert receiver.spans() and receiver.metric_requests
    leaks = []
    if any(SECRET_PART.encode() in body for body in receiver.raw):
        leaks.append("OTLP export")
    if SECRET_PART in log.read_text():
        leaks.append("asyncdiag log records")
    if SECRET_PART in json.dumps(facts):
        leaks.append("findings")
    assert not leaks, (leaks, [line for line in log.read_text().splitlines()
                               if SECRET_PART in line])


def test_demo_with_real_detectors_exports_every_metric_and_finding_kind() -> None:
    """``asyncdiag demo`` (every detector, real instrumentation), configured by environment
    variables only: the whole contract arrives at the collector."""
    with OtlpReceiver() as receiver:
        env = otlp_env(receiver.grpc_endpoint)
        del env["ASYNCDIAG_ENABLED"]  # the demo installs the agent itself
        proc = subprocess.run([sys.executable, "-m", "asyncdiag", "demo"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        latest = metric_by_name(receiver)
        missing = [spec.name for spec in _names.METRICS if spec.name not in latest]
        assert not missing, missing
        logged = {line.split("]")[0].split("[")[1] for line in proc.stderr.splitlines()
                  if line.startswith("asyncdiag: [")}
        counted = {attributes(p.attributes)[_names.ATTR_KIND]: p.as_int
                   for p in data_points(latest[_names.FINDINGS.name])}
        assert set(counted) == logged, (counted, logged)
        assert logged >= {_names.SWALLOWED_EXCEPTION, _names.SLOW_TEARDOWN,
                          _names.ORPHANED_ASYNCGEN}
        subjects = {attributes(p.attributes)[_names.ATTR_SUBJECT]
                    for p in data_points(latest[_names.CONTEXT_EXIT_DURATION.name])}
        assert "asyncdiag._demo.ForgivingTransaction" in subjects
        spans = receiver.spans()
        events = [attributes(e.attributes)[_names.EVENT_ATTR_KIND] for s in spans
                  for e in s.events if e.name == _names.FINDING_EVENT]
        assert _names.SWALLOWED_EXCEPTION in events, [s.name for s in spans]

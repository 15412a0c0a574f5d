"""``asyncdiag.testing.capture``: findings, spans and metrics of a block, in memory."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator

import pytest

import asyncdiag
import asyncdiag.testing
from asyncdiag import _findings, _lifecycle, _names


def _report(kind: str = _names.NEVER_AWAITED, line: int = 10, **kw: object) -> None:
    _findings.report(kind, "a mistake", "subject", location=f"{__file__}:{line}", **kw)  # type: ignore[arg-type]


def _value(points: list[object], **attributes: str) -> float:
    return sum(p.value for p in points if dict(p.attributes) == attributes)  # type: ignore[attr-defined]


def test_capture_installs_for_the_block_and_uninstalls_after() -> None:
    assert _lifecycle.current() is None
    with asyncdiag.testing.capture(slow_callback_duration=0.2) as captured:
        agent = _lifecycle.current()
        assert agent is not None and captured.agent is agent
        assert agent.config.slow_callback_duration == 0.2
        assert agent.config.exporter == "none"
        _report(line=10)
        _report(line=10)
        _report(_names.ORPHANED_ASYNCGEN, line=11)
    assert _lifecycle.current() is None
    _report(line=12)  # after the block: not captured
    assert [(f.kind, f.location, f.count) for f in captured.findings] == [
        (_names.NEVER_AWAITED, f"{__file__}:10", 2),
        (_names.ORPHANED_ASYNCGEN, f"{__file__}:11", 1),
    ]
    assert len(captured.occurrences) == 3
    assert captured.kinds() == {_names.NEVER_AWAITED, _names.ORPHANED_ASYNCGEN}
    assert [f.count for f in captured.findings_of(_names.NEVER_AWAITED)] == [2]
    findings = captured.metric(_names.FINDINGS.name)
    assert _value(findings, kind=_names.NEVER_AWAITED) == 2
    assert _value(findings, kind=_names.ORPHANED_ASYNCGEN) == 1


def test_capture_around_asyncio_run_sees_the_loop_made_inside() -> None:
    async def main() -> list[asyncio.AbstractEventLoop]:
        _report(line=20)
        agent = _lifecycle.current()
        assert agent is not None
        return agent.loops.loops()

    with asyncdiag.testing.capture() as captured:
        loops = asyncio.run(main())
    assert len(loops) == 1
    assert [f.location for f in captured.findings] == [f"{__file__}:20"]


def test_capture_as_async_context_manager_inside_a_running_loop() -> None:
    async def main() -> asyncdiag.testing.Capture:
        async with asyncdiag.testing.capture() as captured:
            agent = _lifecycle.current()
            assert agent is not None
            assert asyncio.get_running_loop() in agent.loops.loops()
            _report(line=30)
        return captured

    captured = asyncio.run(main())
    assert [f.location for f in captured.findings] == [f"{__file__}:30"]
    assert _lifecycle.current() is None


def test_capture_reuses_an_installed_agent_and_counts_only_the_block() -> None:
    agent = asyncdiag.install(exporter="none")
    _report(line=40)
    with asyncdiag.testing.capture() as captured:
        assert _lifecycle.current() is agent
        _report(line=40)
        _report(line=41)
    assert _lifecycle.current() is agent, "a capture must not uninstall an agent it reused"
    assert [(f.location, f.count) for f in captured.findings] == [
        (f"{__file__}:40", 1), (f"{__file__}:41", 1)]
    findings = captured.metric(_names.FINDINGS.name)
    assert _value(findings, kind=_names.NEVER_AWAITED) == 2  # the report before is not counted


def test_spans_made_with_the_agents_tracer_are_captured() -> None:
    with asyncdiag.testing.capture() as captured:
        agent = _lifecycle.current()
        assert agent is not None
        with agent.telemetry.tracer.start_as_current_span("async with demo.Pool"):
            _report(line=50)
    assert captured.span_names() == ["async with demo.Pool"]
    (span,) = captured.spans
    # The finding was delivered as an event of the span that was current.
    assert [e.name for e in span.events] == [_names.FINDING_EVENT]


def test_spans_are_captured_from_a_reused_agent() -> None:
    agent = asyncdiag.install(exporter="none")
    # The tracer is read inside the block, as the instrumentation reads it per operation.
    with asyncdiag.testing.capture() as captured:  # noqa: SIM117
        with agent.telemetry.tracer.start_as_current_span("async for demo.stream"):
            pass
    assert captured.span_names() == ["async for demo.stream"]
    with agent.telemetry.tracer.start_as_current_span("after"):
        pass
    assert captured.span_names() == ["async for demo.stream"]


def test_nested_captures_each_see_their_block() -> None:
    with asyncdiag.testing.capture() as outer:
        _report(line=60)
        with asyncdiag.testing.capture() as inner:
            _report(line=61)
        assert _lifecycle.current() is not None
    assert [f.location for f in outer.findings] == [f"{__file__}:60", f"{__file__}:61"]
    assert [f.location for f in inner.findings] == [f"{__file__}:61"]
    assert _lifecycle.current() is None


def test_collect_metrics_inside_the_block() -> None:
    with asyncdiag.testing.capture() as captured:
        _report(line=70)
        now = captured.collect_metrics()
        assert _value(now[_names.FINDINGS.name], kind=_names.NEVER_AWAITED) == 1
        _report(line=70)
    assert _value(captured.metric(_names.FINDINGS.name), kind=_names.NEVER_AWAITED) == 1


def test_garbage_in_cycles_is_collected_inside_the_block() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            _report(_names.ORPHANED_ASYNCGEN, line=80)

    import gc

    gc.disable()
    try:
        with asyncdiag.testing.capture() as captured:
            Cycle()
    finally:
        gc.enable()
    assert [f.kind for f in captured.findings] == [_names.ORPHANED_ASYNCGEN]


def test_a_capture_cannot_be_entered_twice() -> None:
    captured = asyncdiag.testing.capture()
    with captured, pytest.raises(RuntimeError, match="already active"):
        captured.__enter__()


def test_findings_captured_in_a_test_do_not_fail_it_under_the_plugin(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_inner=textwrap.dedent("""
        import asyncdiag.testing
        from asyncdiag import _findings

        def leak():
            _findings.report("never_awaited", "a mistake", "f", location=f"{__file__}:1")

        def test_asserts_on_its_finding():
            with asyncdiag.testing.capture() as captured:
                leak()
            assert [f.kind for f in captured.findings] == ["never_awaited"]

        def test_not_claimed():
            with asyncdiag.testing.capture(claim=False) as captured:
                leak()
            assert captured.findings
    """))
    result = pytester.runpytest("-p", "no:hypothesispytest", "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_not_claimed - asyncdiag*"])


@asyncdiag.instrument
class Pool:
    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


@asyncdiag.instrument
async def stream() -> AsyncIterator[int]:
    yield 1
    yield 2


async def _use_instrumented() -> None:
    async with Pool():
        pass
    async for _ in stream():
        pass


def _assert_instrumented_telemetry(captured: asyncdiag.testing.Capture) -> None:
    assert sorted(captured.span_names()) == sorted(
        [_names.async_with_span_name("Pool"), _names.async_for_span_name("stream")]
    )
    pool, gen = f"{Pool.__module__}.Pool", f"{stream.__module__}.stream"
    (enter,) = captured.metric(_names.CONTEXT_ENTER_DURATION.name)
    assert dict(enter.attributes) == {_names.ATTR_SUBJECT: pool} and enter.count == 1
    (exit_,) = captured.metric(_names.CONTEXT_EXIT_DURATION.name)
    assert dict(exit_.attributes) == {_names.ATTR_SUBJECT: pool, _names.ATTR_OUTCOME: "ok"}
    assert _value(captured.metric(_names.ITERATOR_YIELDS.name), **{_names.ATTR_SUBJECT: gen}) == 2


def test_spans_and_metrics_of_instrumented_code() -> None:
    with asyncdiag.testing.capture() as captured:
        asyncio.run(_use_instrumented())
    _assert_instrumented_telemetry(captured)
    assert captured.findings == []


def test_spans_and_metrics_of_instrumented_code_with_a_reused_agent() -> None:
    asyncdiag.install(exporter="none")
    asyncio.run(_use_instrumented())  # before the block: not captured
    with asyncdiag.testing.capture() as captured:
        asyncio.run(_use_instrumented())
    _assert_instrumented_telemetry(captured)
    with asyncdiag.testing.capture() as again:
        pass
    assert again.spans == () and again.metric(_names.CONTEXT_ENTER_DURATION.name) == []


def test_spans_are_teed_from_an_agent_with_an_sdk_tracer_provider() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from asyncdiag import _telemetry

    theirs = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(theirs))
    meters = MeterProvider(shutdown_on_exit=False)
    _telemetry.use_providers(provider, meters)
    try:
        asyncdiag.install(exporter="none")
    finally:
        _telemetry.use_providers()
    with asyncdiag.testing.capture() as captured:
        asyncio.run(_use_instrumented())
    _assert_instrumented_telemetry(captured)
    assert len(theirs.get_finished_spans()) == 2, "the application's exporter still gets them"
    asyncio.run(_use_instrumented())
    assert len(captured.spans) == 2 and len(theirs.get_finished_spans()) == 4
    agent = _lifecycle.current()
    assert agent is not None
    assert agent.telemetry._bound_provider is meters, "the agent's own provider is put back"
    asyncdiag.uninstall()
    provider.shutdown()
    meters.shutdown()


def test_a_reused_agent_does_not_keep_each_captures_providers_alive() -> None:
    import gc
    import weakref

    asyncdiag.install(exporter="none")
    with asyncdiag.testing.capture() as captured:
        asyncio.run(_use_instrumented())
    _assert_instrumented_telemetry(captured)
    provider = weakref.ref(captured._meter_provider)
    reader = weakref.ref(captured._metric_reader)
    del captured
    gc.collect()
    assert provider() is None and reader() is None

"""``_spans.set_attributes`` writes into SDK spans directly: it must give exactly what the
SDK's ``Span.set_attributes`` gives, limits included, and step aside where it cannot.
``_spans.context_access`` reaches OpenTelemetry's current Context without the API's calls: it
must act as the API does, and step aside for any other runtime context."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import Span, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asyncdiag import _spans

keys = st.sampled_from(["asyncdiag.subject", "asyncdiag.outcome", "a", "b", "c", "user.key"])
values = st.one_of(
    st.text(max_size=12), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
)


def _pair(limits: SpanLimits | None = None) -> tuple[Any, InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=limits) if limits else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("t"), exporter, provider


def _finished(write: Any, limits: SpanLimits | None, before: dict[str, Any],
              attributes: dict[str, Any]) -> tuple[dict[str, Any], int]:
    tracer, exporter, provider = _pair(limits)
    span = tracer.start_span("s", attributes=before)
    write(span, attributes)
    span.end()
    (done,) = exporter.get_finished_spans()
    provider.shutdown()
    return dict(done.attributes or {}), done.dropped_attributes


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(keys, values, max_size=4),
    st.dictionaries(keys, values, max_size=5),
    st.sampled_from([None, SpanLimits(max_span_attributes=3),
                     SpanLimits(max_span_attribute_length=4)]),
)
def test_same_result_as_the_sdk(before: dict[str, Any], attributes: dict[str, Any],
                                limits: SpanLimits | None) -> None:
    ours = _finished(_spans.set_attributes, limits, before, attributes)
    sdk = _finished(lambda span, a: span.set_attributes(a), limits, before, attributes)
    assert ours == sdk


def test_writes_directly_only_on_the_sdk_span_without_limits() -> None:
    tracer, _, provider = _pair()
    span = tracer.start_span("s")
    assert _spans._supports_direct(span)
    span.end()

    class Recording(Span):  # type: ignore[misc]
        calls: list[dict[str, Any]] = []

        def set_attributes(self, attributes: Any) -> None:
            Recording.calls.append(dict(attributes))
            super().set_attributes(attributes)

    custom = Recording("custom", context=span.get_span_context())
    custom.start()
    _spans.set_attributes(custom, {"a": 1})
    assert Recording.calls == [{"a": 1}]
    custom.end()
    provider.shutdown()


def test_an_ended_span_is_left_to_the_sdk(caplog: pytest.LogCaptureFixture) -> None:
    tracer, _, provider = _pair()
    span = tracer.start_span("s")
    span.end()
    _spans.set_attributes(span, {"a": 1})
    assert "a" not in (span.attributes or {})
    assert "Setting attribute on ended span" in caplog.text
    provider.shutdown()


def test_context_access_is_the_api_on_its_default_runtime_context() -> None:
    get_current, attach, detach = _spans.context_access()
    assert type(otel_context._RUNTIME_CONTEXT) is ContextVarsRuntimeContext
    assert get_current() is otel_context.get_current()
    outer = otel_context.get_current()
    inner = otel_context.set_value("asyncdiag.test", 1)
    token = attach(inner)
    # What one side changes, the other sees: both are the same Context variable.
    assert otel_context.get_current() is inner
    assert otel_context.get_value("asyncdiag.test") == 1
    detach(token)
    assert otel_context.get_current() is outer
    api_token = otel_context.attach(inner)
    assert get_current() is inner
    otel_context.detach(api_token)
    assert get_current() is outer


def test_context_access_steps_aside_for_another_runtime_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Recording(ContextVarsRuntimeContext):
        """A runtime context of one's own, as ``OTEL_PYTHON_CONTEXT`` can select."""

        attached = 0

        def attach(self, context: Any) -> Any:
            Recording.attached += 1
            return super().attach(context)

    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", Recording())
    access = _spans.context_access()
    assert access == (otel_context.get_current, otel_context.attach, otel_context.detach)
    token = access[1](otel_context.set_value("asyncdiag.test", 2))
    assert Recording.attached == 1
    assert otel_context.get_value("asyncdiag.test") == 2
    access[2](token)

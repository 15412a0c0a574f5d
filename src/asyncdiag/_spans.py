"""Spans at the least cost: whether an instrumented operation gets one at all, and writing
the attributes asyncdiag computed.

``tracer.start_span`` costs several microseconds even when the sampler drops the span (ids are
generated and a ``NonRecordingSpan`` is built). The instrumentation's budget per ``async with``
is smaller than that, so when the configured sampler is known to drop the span, no span is
created and no context is attached: the program sees the same current span as without us.

Only samplers whose decision can be reproduced exactly are short-circuited: the SDK's
``ALWAYS_OFF``, and ``ParentBased`` with the default delegates (whose decision is "follow the
parent's sampled flag, else the root"). Any other sampler is asked through ``start_span``.

``Span.set_attributes`` of the SDK validates every value (a chain of ``isinstance`` checks,
two of them against ABCs) under a lock: about 2 us per call here, a tenth of a whole span, for
values asyncdiag made itself (short strings and numbers). On the SDK's own ``Span`` they are
written straight into its attribute dict when that gives exactly what ``set_attributes``
would: room under the attribute count limit, no value length limit, the span not ended.
Anything else (another SDK, a subclass that overrides ``set_attributes``, limits in play) goes
through ``set_attributes``.

OpenTelemetry's current Context is, by default, one ``ContextVar`` that the API reaches through
two Python calls per ``get_current``/``attach``/``detach``. ``context_access`` hands the
wrappers that variable's own ``get``/``set``/``reset`` when the runtime context is the API's
default, and the API's functions otherwise.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

NEVER = 0  # the span would never record: skip it
FOLLOW_PARENT = 1  # ParentBased(root=ALWAYS_OFF): a span only under a sampled parent
FOLLOW_PARENT_ROOT_ON = 2  # ParentBased(root=ALWAYS_ON): a span unless the parent is unsampled
ASK = 3  # ask the tracer


def _static_decision(sampler: Any) -> bool | None:
    """True/False for the SDK's ALWAYS_ON/ALWAYS_OFF, None for anything else."""
    try:
        from opentelemetry.sdk.trace.sampling import Decision, StaticSampler
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return None
    if type(sampler) is not StaticSampler:
        return None
    decision = getattr(sampler, "_decision", None)
    if decision is Decision.DROP:
        return False
    if decision is Decision.RECORD_AND_SAMPLE:
        return True
    return None


def _parent_based_root(sampler: Any) -> bool | None:
    try:
        from opentelemetry.sdk.trace.sampling import ParentBased
    except ImportError:  # pragma: no cover
        return None
    if type(sampler) is not ParentBased:
        return None
    delegates = (
        _static_decision(getattr(sampler, "_remote_parent_sampled", None)),
        _static_decision(getattr(sampler, "_local_parent_sampled", None)),
        _static_decision(getattr(sampler, "_remote_parent_not_sampled", None)),
        _static_decision(getattr(sampler, "_local_parent_not_sampled", None)),
    )
    if delegates != (True, True, False, False):
        return None
    return _static_decision(getattr(sampler, "_root", None))


def evaluate(tracer: Any) -> tuple[int, bool]:
    """``(mode, final)``: the mode for ``tracer`` and whether it can change later (a proxy
    tracer that has no provider yet binds to the one the application sets later)."""
    final = True
    real = tracer
    if isinstance(tracer, trace.ProxyTracer):
        real = getattr(tracer, "_real_tracer", None)
        if real is None:
            if getattr(trace, "_TRACER_PROVIDER", None) is None:
                return NEVER, False
            real = tracer._tracer
    if isinstance(real, trace.NoOpTracer):
        return NEVER, final
    sampler = getattr(real, "sampler", None)
    if sampler is None:
        return ASK, final
    static = _static_decision(sampler)
    if static is False:
        return NEVER, final
    root = _parent_based_root(sampler)
    if root is False:
        return FOLLOW_PARENT, final
    if root is True:
        return FOLLOW_PARENT_ROOT_ON, final
    return ASK, final


ContextAccess = tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], Any]]


def context_access() -> ContextAccess:
    """``(get_current, attach, detach)`` for OpenTelemetry's current Context.

    With the API's default runtime context (``ContextVarsRuntimeContext``, whose three methods
    are ``get``/``set``/``reset`` of its ``ContextVar``) these are the variable's own methods,
    one C call each. One difference, which the callers rule out: the API's ``detach`` logs a
    failed reset, ``ContextVar.reset`` raises; the wrappers reset a token only in the Context
    that made it, once. Any other runtime context (set through ``OTEL_PYTHON_CONTEXT``) is
    used through the API."""
    api: ContextAccess = (otel_context.get_current, otel_context.attach, otel_context.detach)
    try:
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    except ImportError:  # pragma: no cover - part of the API package
        return api
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is not ContextVarsRuntimeContext or type(var) is not contextvars.ContextVar:
        return api
    return var.get, var.set, var.reset


def parent_sampled() -> bool | None:
    """The current span's sampled flag, or None when there is no valid current span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return bool(context.trace_flags.sampled)


# Span type -> whether its attributes can be written directly (read by _speedups' BlockOps).
DIRECT_TYPES: dict[type, bool] = {}


def _supports_direct(span: Any) -> bool:
    try:
        from opentelemetry.attributes import BoundedAttributes
        from opentelemetry.sdk.trace import Span as SdkSpan
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return False
    if not isinstance(span, SdkSpan) or type(span).set_attributes is not SdkSpan.set_attributes:
        return False
    store = getattr(span, "_attributes", None)
    return (
        type(store) is BoundedAttributes
        and type(getattr(store, "_dict", None)) is dict
        and hasattr(store, "maxlen") and hasattr(store, "max_value_len")
        and hasattr(span, "_end_time")
    )


def set_attributes(span: Any, attributes: Mapping[str, str | bool | int | float]) -> None:
    """``span.set_attributes(attributes)`` for values that are valid as they are."""
    kind = type(span)
    direct = DIRECT_TYPES.get(kind)
    if direct is None:
        direct = DIRECT_TYPES[kind] = _supports_direct(span)
    if direct:
        store = span._attributes
        values = store._dict
        limit = store.maxlen
        if (span._end_time is None and store.max_value_len is None
                and (limit is None or len(values) + len(attributes) <= limit)):
            values.update(attributes)
            return
    span.set_attributes(attributes)

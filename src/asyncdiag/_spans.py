"""Deciding, cheaply, whether an instrumented operation gets a span at all.

``tracer.start_span`` costs several microseconds even when the sampler drops the span (ids are
generated and a ``NonRecordingSpan`` is built). The instrumentation's budget per ``async with``
is smaller than that, so when the configured sampler is known to drop the span, no span is
created and no context is attached: the program sees the same current span as without us.

Only samplers whose decision can be reproduced exactly are short-circuited: the SDK's
``ALWAYS_OFF``, and ``ParentBased`` with the default delegates (whose decision is "follow the
parent's sampled flag, else the root"). Any other sampler is asked through ``start_span``.
"""

from __future__ import annotations

from typing import Any

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


def parent_sampled() -> bool | None:
    """The current span's sampled flag, or None when there is no valid current span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return bool(context.trace_flags.sampled)

"""asyncdiag as an OpenTelemetry instrumentor (``opentelemetry_instrumentor`` entry point).

``opentelemetry-instrument python app.py`` configures the SDK providers from the environment,
sets them as the global ones, then calls ``instrument()`` on every installed instrumentor:
asyncdiag is installed then and uses those providers. It is switched off like any other
instrumentation with ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=asyncdiag``.

    from asyncdiag._otel_instrumentor import AsyncdiagInstrumentor
    AsyncdiagInstrumentor().instrument(tracer_provider=tp, meter_provider=mp)  # by hand
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

logger = logging.getLogger("asyncdiag")


class AsyncdiagInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Installs the asyncdiag agent; ``uninstrument()`` uninstalls what it installed."""

    _installed_here = False

    def instrumentation_dependencies(self) -> Collection[str]:
        # asyncdiag instruments asyncio itself (stdlib), not a third-party distribution.
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        # opentelemetry-instrument re-raises any exception from an instrumentor and the
        # application then does not start: nothing may escape from here.
        try:
            from . import _lifecycle, _telemetry

            if _lifecycle.current() is not None:
                logger.info(
                    "asyncdiag: already installed (ASYNCDIAG_ENABLED=1 or install()); the "
                    "OpenTelemetry instrumentor keeps that agent"
                )
                self._installed_here = False
                return
            _telemetry.use_providers(
                tracer_provider=kwargs.get("tracer_provider"),
                meter_provider=kwargs.get("meter_provider"),
            )
            try:
                _lifecycle.install()
            finally:
                _telemetry.use_providers()
            self._installed_here = True
        except Exception as exc:
            logger.warning("asyncdiag: not enabled, install failed: %r", exc)

    def _uninstrument(self, **kwargs: Any) -> None:
        if not self._installed_here:
            return
        self._installed_here = False
        try:
            from . import _lifecycle

            _lifecycle.uninstall()
        except Exception as exc:
            logger.warning("asyncdiag: uninstall failed: %r", exc)

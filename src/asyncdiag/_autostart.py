"""Imported by ``asyncdiag_autostart.pth`` at interpreter start-up when ASYNCDIAG_ENABLED=1.

Whatever happens here, the host program starts: a failed install is one warning on stderr.
"""

from __future__ import annotations


def _autostart() -> None:
    try:
        from . import _lifecycle

        _lifecycle.install()
    except BaseException as exc:
        import sys

        try:
            sys.stderr.write(f"asyncdiag: not enabled, install failed: {exc!r}\n")
        except Exception:
            pass


_autostart()

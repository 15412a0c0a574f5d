"""Imported by ``asyncdiag_autostart.pth`` at interpreter start-up when ASYNCDIAG_ENABLED is
set to something other than empty or ``0``.

The .pth line is kept minimal because site.py compiles it at every interpreter start, agent on
or off; the exact truth test of the variable happens here. Whatever happens here, the host
program starts: a failed install is one warning on stderr.
"""

from __future__ import annotations


def _autostart() -> None:
    try:
        from . import _config, _lifecycle

        if _config.env_flag_enabled():
            _lifecycle.install()
    except BaseException as exc:
        import sys

        try:
            sys.stderr.write(f"asyncdiag: not enabled, install failed: {exc!r}\n")
        except Exception:
            pass


_autostart()

"""What the installed package must carry, whatever built it."""

from __future__ import annotations

import importlib
import shutil
import sysconfig

import pytest


def test_c_hook_is_built_where_a_compiler_is() -> None:
    """A build on a machine with a C compiler ships ``asyncdiag._speedups``. The extension is
    optional (without a compiler the build only warns and the Python hook is used), so a
    broken C build would otherwise go unnoticed."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the Python hook is the one in use")
    speedups = importlib.import_module("asyncdiag._speedups")
    assert callable(speedups.FirstIterHook)

from __future__ import annotations

import asyncio

import asyncdiag


def test_install_uninstall_roundtrip() -> None:
    agent = asyncdiag.install(debug=True, slow_callback_duration=0.2)
    assert asyncdiag.install(debug=True, slow_callback_duration=0.2) is agent

    async def settings() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        return loop.get_debug(), loop.slow_callback_duration

    assert asyncio.run(settings()) == (True, 0.2)
    asyncdiag.uninstall()
    assert asyncio.run(settings()) == (False, 0.1)

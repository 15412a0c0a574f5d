"""The pytest plugin end to end: real mistakes in inner tests, found by the real detectors,
fail the test that made them (pytester, inner sessions in this process)."""

from __future__ import annotations

import gc
import textwrap

import pytest
import wrapt

from asyncdiag import _lifecycle

# pytester's in-process runs restore sys.meta_path afterwards. wrapt inserts its import-hook
# finder once per process, the first time a post-import hook is registered: if that happened
# inside an inner session, the finder would be gone for the rest of this process and every
# later instrument target would silently stay unpatched. Registering here puts it in place
# before any inner session.
wrapt.register_post_import_hook(lambda module: None, "asyncdiag_tests_never_imported")

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
{extra}
"""

MISTAKES = '''
import asyncio, gc, time
import pytest
import asyncdiag
from asyncdiag import _lifecycle


async def numbers():
    yield 1
    yield 2


async def work():
    await asyncio.sleep(0)


async def boom():
    raise ValueError("nobody looks at me")


@asyncdiag.instrument
class Swallow:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        return True


async def orphan_generator():
    async for _ in numbers():
        break  # the generator is dropped unfinished, never closed


async def forget_to_await():
    work()


async def lose_task_exception():
    task = asyncio.ensure_future(boom())
    await asyncio.sleep(0.01)
    del task


async def block_the_loop():
    # After a first await: a block in the very first step of a run is not seen by the loop
    # monitor (it starts watching a loop at the run's first iteration).
    await asyncio.sleep(0.01)
    time.sleep(0.5)


async def swallow_exception():
    async with Swallow():
        raise ValueError("lost")


async def swallow_cancellation():
    async def victim():
        async with Swallow():
            await asyncio.sleep(10)

    task = asyncio.ensure_future(victim())
    await asyncio.sleep(0)
    task.cancel()
    await task  # finishes normally: the cancellation was swallowed


async def abandon_pending_task():
    loop = asyncio.get_running_loop()

    async def waits_forever():
        await loop.create_future()

    task = loop.create_task(waits_forever())
    await asyncio.sleep(0)
    del task  # the only strong reference: collected while pending
    gc.collect()


async def clean():
    gen = numbers()
    try:
        async for _ in gen:
            break
    finally:
        await gen.aclose()
    await work()
    task = asyncio.ensure_future(boom())
    with pytest.raises(ValueError):
        await task
    async with Swallow():
        pass
'''

CASES = {
    "orphaned_asyncgen": "orphan_generator",
    "never_awaited": "forget_to_await",
    "unretrieved_exception": "lose_task_exception",
    "loop_blocked": "block_the_loop",
    "swallowed_exception": "swallow_exception",
    "swallowed_cancellation": "swallow_cancellation",
    "pending_task_destroyed": "abandon_pending_task",
}


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:randomly",
                              "--asyncdiag-blocked-ms=150", *args)


def _setup(pytester: pytest.Pytester, tests: str, ini: str = "") -> None:
    # Garbage left by an earlier in-process session (e.g. its orphaned generators, in reference
    # cycles) must be collected before this session starts, or it is charged to this one.
    gc.unfreeze()
    gc.collect()
    pytester.makeini(INI.format(extra=ini))
    pytester.makepyfile(mistakes=MISTAKES)
    pytester.makepyfile(test_inner="from mistakes import *\nfrom asyncdiag import _lifecycle\n"
                        + textwrap.dedent(tests))


def test_each_mistake_fails_the_test_that_made_it(pytester: pytest.Pytester) -> None:
    # One session, one leaky test per kind between clean ones: each failure must name its
    # own test's mistake and only that one.
    leaky = "\n".join(f"def test_{kind}():\n    asyncio.run({func}())\n\n"
                       f"def test_clean_after_{kind}():\n    asyncio.run(clean())\n"
                       for kind, func in CASES.items())
    _setup(pytester, "def test_clean_first():\n    asyncio.run(clean())\n\n" + leaky)
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=len(CASES) + 1, failed=len(CASES))
    for kind in CASES:
        result.stdout.fnmatch_lines([
            f"*_ test_{kind} _*",
            f"asyncdiag: {kind} at mistakes.py:*",
            "asyncdiag: 1 distinct async mistake(s) found*",
            f"  {kind} *mistakes.py:*",
        ])
        result.stdout.fnmatch_lines([f"FAILED test_inner.py::test_{kind} - asyncdiag: *"])
    # The loop thread's stack while it was stuck, without pytest's and asyncio's frames.
    result.stdout.fnmatch_lines([
        "loop_blocked at mistakes.py:* (stack without pytest, pluggy, asyncio and "
        "asyncdiag frames):",
        '  File "*mistakes.py", line *, in block_the_loop',
        "    time.sleep(0.5)",
    ])


def test_the_same_mistakes_pass_without_the_plugin(pytester: pytest.Pytester) -> None:
    calls = "\n".join(f"def test_{kind}():\n    asyncio.run({func}())\n    "
                      "assert _lifecycle.current() is None\n"
                      for kind, func in CASES.items())
    _setup(pytester, calls)
    result = _run(pytester)
    result.assert_outcomes(passed=len(CASES))
    assert "= asyncdiag =" not in result.stdout.str()
    assert _lifecycle.current() is None


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_pytest_asyncio_tests_are_checked(pytester: pytest.Pytester, mode: str) -> None:
    marker = "@pytest.mark.asyncio" if mode == "strict" else ""
    _setup(pytester, f"""
        {marker}
        async def test_clean():
            await clean()

        {marker}
        async def test_orphan():
            await orphan_generator()

        {marker}
        async def test_never_awaited():
            await forget_to_await()

        {marker}
        async def test_after():
            await clean()
    """, ini=f"asyncio_mode = {mode}")
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "FAILED test_inner.py::test_orphan - asyncdiag*",
        "FAILED test_inner.py::test_never_awaited - asyncdiag*",
    ], consecutive=False)
    result.stdout.fnmatch_lines(["  orphaned_asyncgen *mistakes.py:*"])
    result.stdout.fnmatch_lines(["  never_awaited *mistakes.py:*"])


def test_allow_listed_mistake_passes_and_is_reported(pytester: pytest.Pytester) -> None:
    _setup(pytester, """
        @pytest.mark.asyncdiag_allow("orphaned_asyncgen", "mistakes.py:*", reason="vendored")
        def test_allowed():
            asyncio.run(orphan_generator())

        def test_allowed_by_ini():
            asyncio.run(forget_to_await())
    """, ini="asyncdiag_allow = never_awaited:mistakes.py:*")
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "allowed findings (asyncdiag_allow):",
        "  test_inner.py::test_allowed: orphaned_asyncgen mistakes.py:* "
        "[[]allowed by orphaned_asyncgen:mistakes.py:* (@pytest.mark.asyncdiag_allow, vendored)[]]",
        "  test_inner.py::test_allowed_by_ini: never_awaited mistakes.py:* "
        "[[]allowed by never_awaited:mistakes.py:* (ini asyncdiag_allow)[]]",
    ])


def test_generator_collected_after_the_body_is_charged_to_its_test(
    pytester: pytest.Pytester,
) -> None:
    # The generator sits in a reference cycle, so only the cyclic collector finalizes it:
    # after the test body, at the collection the plugin runs before judging the test.
    _setup(pytester, """
        import gc

        class Holder:
            pass

        def test_leaves_cycle():
            gc.disable()
            async def main():
                holder = Holder()
                holder.me = holder
                holder.gen = numbers()
                await holder.gen.__anext__()
            asyncio.run(main())

        def test_next():
            gc.enable()
            asyncio.run(clean())
    """)
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_leaves_cycle - asyncdiag*"])


def test_marker_checks_one_test(pytester: pytest.Pytester) -> None:
    _setup(pytester, """
        def test_unchecked():
            asyncio.run(orphan_generator())

        @pytest.mark.asyncdiag
        def test_checked():
            asyncio.run(orphan_generator())
    """)
    result = _run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_checked - asyncdiag*"])


def test_session_scoped_loop(pytester: pytest.Pytester) -> None:
    # One loop for the whole session, created before the first test: findings are still
    # charged test by test.
    _setup(pytester, """
        async def test_clean():
            await clean()

        async def test_orphan():
            await orphan_generator()

        async def test_after():
            await clean()
    """, ini="asyncio_mode = auto\nasyncio_default_test_loop_scope = session")
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_orphan - asyncdiag*"])


@pytest.mark.parametrize("kind", ["orphaned_asyncgen", "never_awaited"])
def test_uvloop(pytester: pytest.Pytester, kind: str) -> None:
    pytest.importorskip("uvloop")
    _setup(pytester, f"""
        import uvloop

        def test_clean():
            uvloop.run(clean())

        def test_leaky():
            uvloop.run({CASES[kind]}())
    """)
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"  {kind} *mistakes.py:*"])


def test_pytest_xdist_workers_fail_tests_and_the_controller_summarizes(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("xdist")
    pytester.makeconftest(textwrap.dedent("""
        from asyncdiag import _findings

        def pytest_collection_finish(session):
            # A finding outside any test, on each worker: the controller reports it.
            if hasattr(session.config, "workerinput"):
                _findings.report("never_awaited", "early", "at_import",
                                 location="conftest.py:1")
    """))
    _setup(pytester, """
        @pytest.mark.asyncdiag_allow("orphaned_asyncgen", reason="known")
        def test_allowed():
            asyncio.run(orphan_generator())

        def test_leaky():
            asyncio.run(forget_to_await())

        def test_clean():
            asyncio.run(clean())
    """)
    result = _run(pytester, "--asyncdiag", "-n", "2")
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*= asyncdiag =*",
        "1 test(s) failed because of async mistakes:",
        "  test_inner.py::test_leaky",
        "allowed findings (asyncdiag_allow):",
        "  test_inner.py::test_allowed: orphaned_asyncgen mistakes.py:* "
        "[[]allowed by orphaned_asyncgen (@pytest.mark.asyncdiag_allow, known)[]]",
        "findings outside any test*; 2 of a failing kind, so the session fails:",
        "  never_awaited conftest.py:1 at_import  [[]before any test[]]",
    ])
    assert _lifecycle.current() is None, "the controller must not install the agent"


def test_slow_step_at_the_end_of_a_test_is_charged_to_that_test(
    pytester: pytest.Pytester,
) -> None:
    # The watchdog thread reports a slow step at its next poll, possibly after the test body
    # returned: the plugin waits for that report before judging the test.
    _setup(pytester, """
        async def slow_last_step():
            await asyncio.sleep(0.01)
            time.sleep(0.15)

        def test_slow():
            asyncio.run(slow_last_step())

        def test_next():
            time.sleep(0.2)
    """, ini="asyncdiag_fail_on = slow_callback")
    result = _run(pytester, "--asyncdiag")
    # Normally the call fails; if the watchdog thread is starved of CPU for over a second,
    # the teardown of the same test does. Never the next test.
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 1, outcomes
    result.stdout.fnmatch_lines(["* test_inner.py::test_slow - asyncdiag: slow_callback*"])


def test_ini_instrument_targets_find_swallowed_exceptions(pytester: pytest.Pytester) -> None:
    # The class is not decorated: the ini option names it, and the agent (installed before
    # collection) patches it when the test module imports it.
    pytester.makepyfile(pool=textwrap.dedent("""
        class Pool:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc_info):
                return True
    """))
    _setup(pytester, """
        from pool import Pool

        async def use():
            async with Pool():
                raise KeyError("lost")

        def test_swallows():
            asyncio.run(use())
    """, ini="asyncdiag_instrument = pool:Pool")
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["asyncdiag: swallowed_exception at test_inner.py:*"])


def test_pytest_xdist_with_markers_only(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    _setup(pytester, """
        def test_unchecked():
            asyncio.run(orphan_generator())

        @pytest.mark.asyncdiag
        def test_checked():
            asyncio.run(orphan_generator())
    """)
    result = _run(pytester, "-n", "2")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*= asyncdiag =*",
        "1 test(s) failed because of async mistakes:",
        "  test_inner.py::test_checked",
    ])


def test_generator_released_by_a_later_test_names_the_test_that_made_it(
    pytester: pytest.Pytester,
) -> None:
    # The generator outlives its test (a module global keeps it) and is finalized when the
    # next test lets go: that test is failed, and the message points at the maker.
    _setup(pytester, """
        KEEP = []

        def test_keeps():
            async def main():
                gen = numbers()
                await gen.__anext__()
                KEEP.append(gen)
            loop = asyncio.new_event_loop()  # never shut down: nobody closes the generator
            loop.run_until_complete(main())
            KEEP.append(loop)

        def test_releases():
            KEEP.clear()
    """)
    result = _run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_releases _*",
        "asyncdiag: orphaned_asyncgen at test_inner.py:*",
        "note: test_inner.py:* is in the code of test_inner.py::test_keeps: that test made "
        "the object, and it was only finalized while this test ran",
    ])

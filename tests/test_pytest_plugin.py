"""The pytest plugin, driven through ``pytester`` (an inner pytest session in this process).

Findings here come from ``asyncdiag._findings.report`` called inside the inner tests: that is
the one real path by which every detector produces findings, so these tests exercise the
plugin's attribution, judging and reporting without depending on a particular detector.
End-to-end tests with the real detectors are in ``test_pytest_plugin_e2e.py``.
"""

from __future__ import annotations

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

HEADER = """
import asyncio, gc, threading
import pytest, pytest_asyncio
from asyncdiag import _findings, _lifecycle

def leak(kind="orphaned_asyncgen", line=3, subject="agen", **kw):
    _findings.report(kind, "a mistake was made", subject, location=f"{__file__}:{line}", **kw)
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # Hypothesis' plugin costs about a second per inner session; these tests do not need it.
    return pytester.runpytest("-p", "no:hypothesispytest", *args)


def make(pytester: pytest.Pytester, body: str, ini: str = "", name: str = "test_inner") -> None:
    pytester.makeini(INI.format(extra=ini))
    pytester.makepyfile(**{name: HEADER + textwrap.dedent(body)})


def test_not_enabled_changes_nothing(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_leaky(request):
            leak()
            assert _lifecycle.current() is None
            assert not request.config.pluginmanager.has_plugin("asyncdiag-session")
    """)
    result = run(pytester, )
    result.assert_outcomes(passed=1)
    assert "= asyncdiag =" not in result.stdout.str()


def test_leaky_test_fails_with_the_findings_and_locations(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_clean():
            assert _lifecycle.current() is not None
            asyncio.run(asyncio.sleep(0))

        def test_leaky():
            leak("never_awaited", 7, "make_coro")
            leak("never_awaited", 7, "make_coro")
            leak("unretrieved_exception", 9, "worker", task="Task-3")
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_leaky _*",
        "asyncdiag: never_awaited at test_inner.py:7, unretrieved_exception at test_inner.py:9",
        "asyncdiag: 2 distinct async mistake(s) found (3 occurrence(s)):",
        "  never_awaited * test_inner.py:7  make_coro  [[]x2[]]",
        "  unretrieved_exception * test_inner.py:9  worker  [[]x1[]]",
        '*@pytest.mark.asyncdiag_allow("never_awaited", "test_inner.py:7")*',
        "*= asyncdiag =*",
        "1 test(s) failed because of async mistakes:",
        "  test_inner.py::test_leaky",
        "FAILED test_inner.py::test_leaky - asyncdiag: never_awaited at test_inner.py*",
    ])
    assert _lifecycle.current() is None, "the plugin must uninstall at session end"


def test_ini_option_enables_and_agent_uses_test_config(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_config():
            config = _lifecycle.current().config
            assert config.exporter == "none"
            assert config.blocked_threshold == pytest.approx(0.25)
            assert config.slow_callback_duration == pytest.approx(0.05)
            assert config.slow_teardown_threshold == pytest.approx(0.3)
    """, ini="asyncdiag = true\nasyncdiag_blocked_ms = 250\nasyncdiag_slow_teardown_ms = 300")
    result = run(pytester, "--asyncdiag-slow-callback-ms=50")
    result.assert_outcomes(passed=1)


def test_cli_threshold_overrides_ini(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_config():
            assert _lifecycle.current().config.blocked_threshold == pytest.approx(0.1)
    """, ini="asyncdiag_blocked_ms = 250")
    run(pytester, "--asyncdiag", "--asyncdiag-blocked-ms=100").assert_outcomes(passed=1)


def test_bad_threshold_is_a_usage_error(pytester: pytest.Pytester) -> None:
    make(pytester, "def test_x(): pass\n")
    result = run(pytester, "--asyncdiag", "--asyncdiag-blocked-ms=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--asyncdiag-blocked-ms='soon' is not a number*"])


def test_allow_by_marker_and_ini_passes_and_is_reported(pytester: pytest.Pytester) -> None:
    make(pytester, """
        @pytest.mark.asyncdiag_allow("orphaned_asyncgen", "test_inner.py:3", reason="lib bug")
        def test_marker():
            leak("orphaned_asyncgen", 3)

        @pytest.mark.asyncdiag_allow("never_awaited:*/test_inner.py:*")
        def test_marker_one_string():
            leak("never_awaited", 11)

        def test_ini():
            leak("swallowed_exception", 5, "Pool")

        def test_ini_subject_glob():
            leak("swallowed_cancellation", 6, "vendor.streams.Reader")

        @pytest.mark.asyncdiag_allow("orphaned_asyncgen", "test_inner.py:99")
        def test_other_location_still_fails():
            leak("orphaned_asyncgen", 3)
    """, ini="asyncdiag_allow =\n  swallowed_exception:test_inner.py:5\n"
             "  swallowed_cancellation:vendor.*")
    result = run(pytester, "--asyncdiag", "--junitxml=report.xml")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines([
        "allowed findings (asyncdiag_allow):",
        "  test_inner.py::test_marker: orphaned_asyncgen test_inner.py:3 agen"
        "  [[]allowed by orphaned_asyncgen:test_inner.py:3"
        " (@pytest.mark.asyncdiag_allow, lib bug)[]]",
        "  test_inner.py::test_marker_one_string: never_awaited test_inner.py:11 agen*",
        "  test_inner.py::test_ini: swallowed_exception test_inner.py:5 Pool"
        "  [[]allowed by swallowed_exception:test_inner.py:5 (ini asyncdiag_allow)[]]",
        "  test_inner.py::test_ini_subject_glob: swallowed_cancellation *vendor.streams.Reader*",
    ])
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_other_location_still_fails*"])
    xml = (pytester.path / "report.xml").read_text()
    assert 'name="asyncdiag_allowed"' in xml
    assert "orphaned_asyncgen test_inner.py:3 agen" in xml


def test_allow_with_unknown_kind_is_a_usage_error(pytester: pytest.Pytester) -> None:
    make(pytester, "def test_x(): pass\n", ini="asyncdiag_allow = orphaned_generator:x.py:1")
    result = run(pytester, "--asyncdiag")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown finding kind 'orphaned_generator'*"])


def test_timing_kinds_are_listed_not_failing_by_default(pytester: pytest.Pytester) -> None:
    body = """
        def test_slow():
            leak("slow_callback", 4, "cb", duration=0.3)
            leak("slow_teardown", 5, "Pool", duration=0.7)
    """
    make(pytester, body)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "findings of kinds that do not fail tests (asyncdiag_fail_on):",
        "  test_inner.py::test_slow: slow_callback test_inner.py:4 cb (300.0 ms)",
        "  test_inner.py::test_slow: slow_teardown test_inner.py:5 Pool (700.0 ms)",
    ])
    make(pytester, body, ini="asyncdiag_fail_on = all")
    run(pytester, "--asyncdiag").assert_outcomes(failed=1)
    make(pytester, body, ini="asyncdiag_fail_on = slow_teardown")
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  slow_teardown * test_inner.py:5  Pool  [[]x1, max 700.0 ms[]]"])


def test_unknown_fail_on_kind_is_a_usage_error(pytester: pytest.Pytester) -> None:
    make(pytester, "def test_x(): pass\n", ini="asyncdiag_fail_on = never_awaited, blocked")
    result = run(pytester, "--asyncdiag")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown finding kind 'blocked'*"])


def test_marker_enables_only_the_marked_tests(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_unmarked_before():
            assert _lifecycle.current() is None
            leak()

        @pytest.mark.asyncdiag
        def test_marked_clean():
            assert _lifecycle.current() is not None

        @pytest.mark.asyncdiag
        def test_marked_leaky():
            assert _lifecycle.current() is not None
            leak()

        def test_unmarked_after():
            assert _lifecycle.current() is None
            leak()
    """)
    result = run(pytester)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_marked_leaky*"])
    assert _lifecycle.current() is None


def test_reuses_an_agent_installed_before_and_leaves_it(pytester: pytest.Pytester) -> None:
    agent = _lifecycle.install(exporter="none")
    make(pytester, """
        def test_leaky():
            leak()
    """)
    run(pytester, "--asyncdiag").assert_outcomes(failed=1)
    assert _lifecycle.current() is agent


def test_finding_from_garbage_collected_cycle_is_charged_to_its_test(
    pytester: pytest.Pytester,
) -> None:
    # An object in a reference cycle is finalized only by the cyclic collector: without the
    # collection at the end of the call it would be reported during some later test.
    make(pytester, """
        class Cycle:
            def __init__(self):
                self.me = self
            def __del__(self):
                leak("orphaned_asyncgen", 21, "Cycle")

        def test_makes_cycle():
            gc.disable()
            Cycle()

        def test_next():
            gc.enable()
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_makes_cycle - *"])


def test_finding_in_fixture_teardown_errors_that_test(pytester: pytest.Pytester) -> None:
    make(pytester, """
        @pytest.fixture
        def resource():
            yield
            leak("pending_task_destroyed", 12, "Task-1")

        def test_uses_resource(resource):
            pass

        def test_next():
            pass
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_uses_resource*",
        "asyncdiag: pending_task_destroyed at test_inner.py:12",
        "asyncdiag: async mistakes found while this test was torn down*",
        "  pending_task_destroyed * test_inner.py:12  Task-1  [[]x1[]]",
    ])


def test_failed_test_keeps_its_error_and_gets_findings_section(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_both():
            leak()
            assert 1 == 2
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*assert 1 == 2*",
        "*- asyncdiag findings -*",
        "  orphaned_asyncgen * test_inner.py:3  agen  [[]x1[]]",
    ])


def test_finding_from_another_thread_is_attributed(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_thread():
            t = threading.Thread(target=leak, args=("loop_blocked", 8, "main loop"))
            t.start()
            t.join()
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  loop_blocked * test_inner.py:8  main loop  [[]x1[]]"])


def test_finding_outside_any_test_fails_the_session(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(HEADER + textwrap.dedent("""
        def pytest_collection_finish(session):
            leak("never_awaited", 30, "at_import")
    """))
    make(pytester, "def test_x(): pass\n")
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "findings outside any test (collection, between tests, session end); "
        "1 of a failing kind, so the session fails:",
        "  never_awaited conftest.py:30 at_import  [[]before any test[]]",
    ])


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_pytest_asyncio_modes(pytester: pytest.Pytester, mode: str) -> None:
    marker = "@pytest.mark.asyncio" if mode == "strict" else ""
    make(pytester, f"""
        @pytest_asyncio.fixture
        async def conn():
            yield asyncio.get_running_loop()

        {marker}
        async def test_async_leaky(conn):
            await asyncio.sleep(0)
            leak("swallowed_cancellation", 14, "Reader")

        {marker}
        async def test_async_clean(conn):
            await asyncio.sleep(0)
            assert _lifecycle.current().loops.loops() == [asyncio.get_running_loop()]
    """, ini=f"asyncio_mode = {mode}")
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_async_leaky - asyncdiag*"])


def test_survivors_are_frozen_between_tests_and_thawed_at_the_end(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from asyncdiag import _pytest_plugin

    # An object that outlives its test is frozen; released later in a cycle, it is found at
    # the next thaw (here after every test) inside the test that released it.
    monkeypatch.setattr(_pytest_plugin, "_THAW_EVERY", 1)
    # 3.12 keeps its statically allocated objects in the permanent generation: count from here.
    baseline = gc.get_freeze_count()
    make(pytester, """
        BASELINE_FREEZE = gc.get_freeze_count()
        KEEP = []

        class Cycle:
            def __init__(self):
                self.me = self
            def __del__(self):
                leak("orphaned_asyncgen", 40, "Cycle")

        def test_keeps():
            KEEP.append(Cycle())

        def test_frozen():
            assert gc.get_freeze_count() > BASELINE_FREEZE

        def test_releases():
            KEEP.clear()
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_releases*"])
    assert gc.get_freeze_count() == baseline


def test_no_freezing_when_gc_collect_is_off(pytester: pytest.Pytester) -> None:
    make(pytester, """
        BASELINE_FREEZE = gc.get_freeze_count()

        def test_one():
            pass

        def test_two():
            assert gc.get_freeze_count() == BASELINE_FREEZE
    """, ini="asyncdiag_gc_collect = false")
    run(pytester, "--asyncdiag").assert_outcomes(passed=2)


def test_repeats_are_folded_in_the_message_and_the_summary(pytester: pytest.Pytester) -> None:
    make(pytester, """
        def test_hot():
            for _ in range(3000):  # past the raw bound: folded as they come
                leak("never_awaited", 4, "hot")

        @pytest.mark.asyncdiag_allow("slow_callback")
        def test_allowed_repeats():
            for _ in range(3):
                leak("slow_callback", 5, "cb", duration=0.2)
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "asyncdiag: 1 distinct async mistake(s) found (3000 occurrence(s)):",
        "  never_awaited * test_inner.py:4  hot  [[]x3000[]]",
    ])
    result.stdout.fnmatch_lines([
        "  test_inner.py::test_allowed_repeats: slow_callback test_inner.py:5 cb x3 (200.0 ms)"
        "  [[]allowed by slow_callback (@pytest.mark.asyncdiag_allow)[]]",
    ])
    assert result.stdout.str().count("test_inner.py::test_allowed_repeats: slow_callback") == 1


def test_bad_allow_marker_is_an_error_of_that_test(pytester: pytest.Pytester) -> None:
    make(pytester, """
        @pytest.mark.asyncdiag_allow("orphaned_generator")
        def test_typo():
            pass

        def test_fine():
            pass
    """)
    result = run(pytester, "--asyncdiag")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*unknown finding kind 'orphaned_generator'*"])


def test_a_test_calling_gc_collect_gets_a_complete_collection(pytester: pytest.Pytester) -> None:
    import gc

    collect = gc.collect
    baseline = gc.get_freeze_count()  # not 0 on 3.12: its static objects are permanent
    make(pytester, """
        import weakref

        KEEP = []

        class Node:
            pass

        def test_keeps():
            node = Node()
            node.me = node
            KEEP.append(node)

        def test_releases_and_collects():
            ref = weakref.ref(KEEP[0])
            KEEP.clear()
            gc.collect()  # the cycle was frozen at the end of test_keeps: thawed first
            assert ref() is None
    """)
    run(pytester, "--asyncdiag").assert_outcomes(passed=2)
    assert gc.collect is collect and gc.get_freeze_count() == baseline

"""Findings: the record, folding of repeats, the bounded store, delivery to the logger."""

from __future__ import annotations

import gc
import logging
import threading

import pytest

import asyncdiag
from asyncdiag import _findings, _names
from asyncdiag._findings import Finding, FindingStore, format_summary, report


def test_finding_has_the_contract_fields() -> None:
    assert report("slow_teardown", "exit took too long", "db.Pool",
                  location="svc.py:10", duration=0.7, task="Task-3") == 1
    [finding] = asyncdiag.findings()
    assert isinstance(finding, asyncdiag.Finding)
    assert (finding.kind, finding.message, finding.subject, finding.location,
            finding.duration, finding.task, finding.count) == (
        "slow_teardown", "exit took too long", "db.Pool", "svc.py:10", 0.7, "Task-3", 1)


def test_a_million_repeats_fold_into_one_finding(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncdiag"):
        for i in range(1_000_000):
            report("never_awaited", "coroutine never awaited", "job",
                   location="app.py:5", duration=None if i % 2 else float(i % 7))
    [finding] = asyncdiag.findings()
    assert finding.count == 1_000_000
    assert finding.duration == 6.0  # the longest seen
    # logged at 1, 10, 100, ..., 1_000_000: seven lines, not a million
    assert len(caplog.records) == 7


def test_same_kind_different_locations_stay_apart() -> None:
    report("slow_callback", "m", "f", location="a.py:1")
    report("slow_callback", "m", "f", location="a.py:2")
    report("loop_blocked", "m", "f", location="a.py:1")
    report("slow_callback", "m", "f", location="a.py:1")
    assert [(f.kind, f.location, f.count) for f in asyncdiag.findings()] == [
        ("slow_callback", "a.py:2", 1),
        ("loop_blocked", "a.py:1", 1),
        ("slow_callback", "a.py:1", 2),
    ]


def test_without_location_findings_fold_by_subject() -> None:
    report("pending_task_destroyed", "m", "worker")
    report("pending_task_destroyed", "m", "worker")
    report("pending_task_destroyed", "m", "other")
    assert sorted((f.subject, f.count) for f in asyncdiag.findings()) == [
        ("other", 1), ("worker", 2)]


def test_store_is_bounded() -> None:
    store = FindingStore(max_distinct=100)
    for i in range(1000):
        store.add(Finding("slow_callback", "m", "f", location=f"a.py:{i}"))
    snapshot = store.snapshot()
    assert len(snapshot) == 100
    assert store.evicted == 900
    assert snapshot[-1].location == "a.py:999"
    assert "900 older distinct finding(s) dropped" in format_summary(snapshot,
                                                                     evicted=store.evicted)


def test_unknown_kind_is_an_internal_error_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncdiag"):
        assert report("not_a_kind", "m", "f") == 0
    assert asyncdiag.findings() == []
    assert "internal error" in caplog.text


def test_findings_snapshots_are_copies() -> None:
    report("slow_callback", "m", "f", location="a.py:1")
    snapshot = asyncdiag.findings()
    report("slow_callback", "m", "f", location="a.py:1")
    assert snapshot[0].count == 1
    snapshot[0].count = 5
    assert asyncdiag.findings()[0].count == 2


def test_failing_sink_is_disabled_and_delivery_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FindingStore()
    seen: list[str] = []

    def broken_sink(finding: Finding, span: object) -> None:
        raise RuntimeError("exporter bug")

    store.add_sink(broken_sink)
    store.add_listener(lambda f: seen.append(f.kind))
    with caplog.at_level(logging.ERROR, logger="asyncdiag"):
        store.add(Finding("slow_callback", "m", "f", location="x:1"))
        store.add(Finding("slow_callback", "m", "f", location="x:1"))
    assert seen == ["slow_callback", "slow_callback"]
    assert caplog.text.count("internal error") == 1


def test_report_from_threads_and_gc_finalizers() -> None:
    class ReportsWhenCollected:
        def __init__(self) -> None:
            self.me = self  # a cycle, so the GC (not refcounting) finalizes it

        def __del__(self) -> None:
            report("pending_task_destroyed", "collected", "cycle", location="gc.py:1")

    def worker() -> None:
        for _ in range(2000):
            report("slow_callback", "m", "f", location="t.py:1")
            ReportsWhenCollected()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gc.collect()
    counts = {f.kind: f.count for f in asyncdiag.findings()}
    assert counts["slow_callback"] == 8000
    assert counts["pending_task_destroyed"] == 8000


def test_summary_groups_by_kind_in_contract_order() -> None:
    findings = [
        Finding("orphaned_asyncgen", "gen abandoned", "stream", location="s.py:3", count=2),
        Finding("slow_callback", "blocked", "handler", location="h.py:9", duration=0.25),
    ]
    text = format_summary(findings)
    assert text.index("slow_callback") < text.index("orphaned_asyncgen")
    assert "max 250.0 ms" in text and "x2" in text
    assert format_summary([]) == "asyncdiag: no async mistakes found.\n"


def test_every_contract_kind_is_accepted() -> None:
    for kind in _names.FINDING_KINDS:
        assert report(kind, "m", "s", location=f"{kind}.py:1") == 1
    assert {f.kind for f in asyncdiag.findings()} == set(_names.FINDING_KINDS)
    assert len(_findings.STORE.snapshot()) == 9

"""The comm thread runs tasks in submission order and hands their errors to the waiter."""

from __future__ import annotations

import threading

import pytest

from hetrain.comm.overlap import CommThread


def test_tasks_run_in_order_off_the_main_thread_and_errors_reach_the_waiter():
    thread = CommThread()
    seen: list[tuple[int, bool]] = []
    main = threading.get_ident()
    futures = [thread.submit(lambda i=i: seen.append((i, threading.get_ident() == main)))
               for i in range(5)]

    def fail():
        raise ValueError("bucket 3 failed")

    bad = thread.submit(fail)
    for fut in futures:
        fut.result(timeout=10)
    with pytest.raises(ValueError, match="bucket 3 failed"):
        bad.result(timeout=10)
    assert thread.submit(lambda: 7).result(timeout=10) == 7  # still serving after an error
    thread.close()
    assert seen == [(i, False) for i in range(5)]

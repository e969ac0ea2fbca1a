"""The cyclic collector is paused inside, and left as the caller had it after (error or not)."""

import gc

import pytest

from hetrain.gcpause import cyclic_gc_paused


@pytest.fixture(autouse=True)
def _collector_on():
    gc.enable()
    yield
    gc.enable()


def test_paused_inside_restored_after_even_on_error():
    with pytest.raises(ValueError), cyclic_gc_paused():
        assert not gc.isenabled()
        raise ValueError("boom")
    assert gc.isenabled()


def test_nested_and_decorated_calls_leave_an_outer_pause_alone():
    @cyclic_gc_paused()
    def inner() -> bool:
        return gc.isenabled()

    with cyclic_gc_paused():
        assert inner() is False
        assert not gc.isenabled()  # the inner exit did not turn it back on
    assert gc.isenabled()
    assert inner() is False and gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off():
    gc.disable()
    with cyclic_gc_paused():
        pass
    assert not gc.isenabled()

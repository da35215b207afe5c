"""``collection_paused``: Python's cycle collector off while any thread's burst of objects is made."""

import gc

import pytest

from mailadmin.collector import collection_paused


def test_the_collector_stays_off_while_any_pause_lasts_and_comes_back_after_the_last():
    assert gc.isenabled()
    first, second = collection_paused(), collection_paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the second still lasts
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_switched_off_before_stays_off():
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_comes_back_when_the_work_fails():
    with pytest.raises(RuntimeError), collection_paused():
        raise RuntimeError("the read failed")
    assert gc.isenabled()

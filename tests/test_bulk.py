"""The cyclic collector's pause (``pipeline.bulk``) leaves the collector as it found it."""

from __future__ import annotations

import gc

import pytest

from pipeline.bulk import collector_paused, per_image


def test_the_collector_is_paused_inside_and_restored_after_an_error_and_when_nested():
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with collector_paused():
            assert not gc.isenabled()
            with collector_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the inner pause does not end the outer one
            raise ValueError
    assert gc.isenabled()


def test_a_collector_already_paused_stays_paused():
    gc.disable()
    try:
        assert per_image(gc.isenabled)() is False
        assert not gc.isenabled()
    finally:
        gc.enable()

"""cnpose_trt.checks: the argument checks written once (bools are never integers, bounds are said)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnpose_trt import checks


@pytest.mark.parametrize("value", [1, 7, np.int64(4), np.int32(1), np.uint8(9)])
def test_integer_accepts_ints_in_range(value):
    out = checks.integer("n", value, 1, 9)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, "3", None, 0, 10, [1]])
def test_integer_refuses_and_names_the_argument(value):
    with pytest.raises(ValueError, match=r"^n must be an integer in 1\.\.9, got "):
        checks.integer("n", value, 1, 9)


def test_integer_bounds_hint_none_and_error_type():
    assert checks.integer("t", None, 0, none=True) is None
    with pytest.raises(ValueError, match=r"t must be a non-negative integer \(0: one per core\) or None, got -1"):
        checks.integer("t", -1, 0, none=True, hint="0: one per core")
    with pytest.raises(TypeError, match=r"s must be an integer <= 3, got 4"):
        checks.integer("s", 4, hi=3, error=TypeError)
    assert checks.integer("big", 2**40) == 2**40
    with pytest.raises(ValueError, match=r"^p must be a positive integer, got 0$"):
        checks.integer("p", 0, 1)
    with pytest.raises(ValueError, match=r"^q must be an integer >= 2, got 1$"):
        checks.integer("q", 1, 2)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None, 0.0])
def test_number_refuses_non_finite_bools_and_out_of_range(value):
    with pytest.raises(ValueError, match=r"^b must be a finite number > 0"):
        checks.number("b", value, above=0)


def test_number_accepts_numpy_and_ints():
    assert checks.number("x", np.float32(0.5), 0, 1) == 0.5
    assert checks.number("x", 1, 0, 1) == 1.0
    with pytest.raises(ValueError, match=r"x must be a finite number in 0\.\.1, got 1\.5"):
        checks.number("x", 1.5, 0, 1)


def test_flag_and_words():
    assert checks.flag("f", True) is True and checks.flag("f", np.bool_(False)) is False
    assert checks.flag("f", "on", words=True) is True and checks.flag("f", "off", words=True) is False
    assert checks.flag("f", None, none=True) is None
    for bad in (1, 0, "on", "yes", None):
        with pytest.raises(ValueError, match=r"^f must be True or False, got"):
            checks.flag("f", bad)
    with pytest.raises(ValueError, match=r"^f must be on or off \(True or False\), got 'yes'"):
        checks.flag("f", "yes", words=True)


def test_one_of_never_takes_a_bool_for_a_number():
    assert checks.one_of("p", "fp16", ("fp32", "fp16")) == "fp16"
    with pytest.raises(ValueError, match=r"p must be one of 0, 1, got True"):
        checks.one_of("p", True, (0, 1))
    with pytest.raises(ValueError, match=r"p must be one of fp32, fp16, got 'int4'"):
        checks.one_of("p", "int4", ("fp32", "fp16"))
    with pytest.raises(ValueError, match="p must be one of"):
        checks.one_of("p", ["fp32"], ("fp32",))


def test_identifier():
    assert checks.identifier("a") and checks.identifier(3) and checks.identifier(np.int64(3))
    assert not checks.identifier(True) and not checks.identifier(3.0) and not checks.identifier(None)

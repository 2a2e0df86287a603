"""The one argument checker: integers (never a bool), numbers, choices, each error in its caller's words."""
import re

import pytest

from utils.common.checks import check_choice, check_int, check_number, int_rule, is_int, is_number


@pytest.mark.parametrize("value, allowed", [(1, True), (0, False), (True, False), (2.0, False), ("3", False)])
def test_is_int_refuses_bools_floats_and_values_below_the_minimum(value, allowed):
    assert is_int(value, minimum=1) is allowed


def test_is_int_honours_the_maximum():
    assert is_int(9, 0, 9) and not is_int(10, 0, 9)


@pytest.mark.parametrize("value, allowed", [(0.5, True), (0, True), (1.0, False), (-0.1, False),
                                            (float("nan"), False), (False, False)])
def test_is_number_is_a_half_open_range(value, allowed):
    assert is_number(value, 0.0, below=1.0) is allowed


def test_check_int_returns_the_value_and_lets_none_pass_when_optional():
    assert check_int("n", 3, minimum=1) == 3
    assert check_int("n", None, minimum=1, optional=True) is None


def test_check_int_words_the_rule_from_its_bounds():
    assert int_rule(1) == "an integer >= 1"
    assert int_rule(0, 9) == "an integer in 0..9"
    assert int_rule(1, optional=True) == "None or an integer >= 1"
    with pytest.raises(ValueError, match=re.escape("max_steps=0 is not allowed: it must be None or an integer >= 1.")):
        check_int("max_steps", 0, minimum=1, optional=True)


def test_check_int_fills_the_callers_template():
    with pytest.raises(ValueError, match=re.escape("f(k=True): k must be an integer >= 2.")):
        check_int("k", True, minimum=2, call="f", message="{call}({name}={value!r}): {name} must be {rule}.")


def test_check_number_refuses_the_bound_itself_with_above():
    assert check_number("m", 0.5, above=0, rule="a number > 0") == 0.5
    with pytest.raises(ValueError, match=re.escape("m=0 is not allowed: it must be a number > 0.")):
        check_number("m", 0, above=0, rule="a number > 0")


def test_check_choice_lists_the_choices():
    assert check_choice("mode", "online", ("online", "offline")) == "online"
    with pytest.raises(ValueError, match=re.escape("mode='cloud' is not allowed: it must be one of 'online', 'offline'.")):
        check_choice("mode", "cloud", ("online", "offline"))

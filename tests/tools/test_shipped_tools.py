"""The shipped tools' results and refusals, and the registry that runs tools: only registered
ones, arguments checked, time and output bounded, never an exception into the caller."""

import multiprocessing
import time

import pytest

from promptbake.tools import Call, Registry, ToolError, ToolSpec, shipped
from promptbake.tools.calculator import calculate
from promptbake.tools.dates import days_between, weekday
from promptbake.tools.lookup import lookup
from promptbake.tools.units import convert, rounded


@pytest.mark.parametrize("expression, value", [
    ("17 * 23", "391"), ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("7 / 2", "3.5"),
    ("8 / 2", "4"), ("7 // 2", "3"), ("-7 % 3", "2"), ("2 ^ 10", "1024"), ("2 ** -1", "0.5"),
    ("-3 ** 2", "-9"), ("+5", "5"), ("17 × 23", "391"), ("10 ÷ 4", "2.5"), ("1 / 3", "0.3333333333"),
    ("sqrt(144)", "12"), ("abs(-4.5)", "4.5"), ("round(2.567, 2)", "2.57"), ("1e3 + 1", "1001"),
    ("0.1 + 0.2", "0.3"), ("10 ** 20", "100000000000000000000"), ("2 ** 0.5", "1.414213562"),
])
def test_calculator_values(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, words", [
    ("__import__('os').system('echo hi')", "not arithmetic"),
    ("x + 1", "not arithmetic"),
    ("(1).real", "not arithmetic"),
    ("'a' * 3", "not a number"),
    ("1 < 2", "not arithmetic"),
    ("lambda: 1", "not arithmetic"),
    ("[1, 2]", "not arithmetic"),
    ("1, 2", "not arithmetic"),
    ("1,000 + 5", "thousands separators"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("2 ** 1000", "larger than 1e+100"),
    ("9 ** 9 ** 9", "larger than 1e+100"),  # would take minutes and gigabytes
    ("0.5 ** -400", "larger than 1e+100"),
    ("10 ** 60 * 10 ** 60", "larger than 1e+100"),
    ("1e308 * 10", "larger than 1e+100"),
    ("(-8) ** 0.5", "not a real number"),
    ("sqrt(-1)", "not a real number"),
    ("sqrt(1, 2)", "takes 1 argument"),
    ("round(1.5, 0.5)", "number of digits"),
    ("1 +", "cannot read"),
    ("", "give an arithmetic expression"),
    ("1 + " * 100 + "1", "the limit is 200"),
])
def test_calculator_refuses_with_the_reason_and_quickly(expression, words):
    started = time.perf_counter()
    with pytest.raises(ToolError, match=words.replace("(", r"\(").replace("+", r"\+")):
        calculate(expression)
    assert time.perf_counter() - started < 0.5


def test_deep_nesting_within_the_length_limit_is_computed():
    assert calculate("-" * 199 + "1") == "-1"
    assert calculate("(" * 90 + "2" + ")" * 90 + " * 3") == "6"


@pytest.mark.parametrize("value, source, target, text", [
    (5, "km", "mi", "5 km = 3.11 mi"), (100, "C", "F", "100 C = 212 F"),
    (-40, "F", "C", "-40 F = -40 C"), (0, "K", "C", "0 K = -273.15 C"),
    (1, "mm", "in", "1 mm = 0.0394 in"), (2.5, "kg", "g", "2.5 kg = 2500 g"),
    (90, "min", "h", "90 min = 1.5 h"), (100, "km/h", "mph", "100 km/h = 62.14 mph"),
    (1, "gal", "l", "1 gal = 3.79 l"), (1, "mg", "kg", "1 mg = 0.000001 kg"),
])
def test_unit_conversions(value, source, target, text):
    assert convert(value, source, target) == text


@pytest.mark.parametrize("value, source, target, words", [
    (5, "km", "kg", "cannot convert length (km) to mass (kg)"),
    (5, "furlong", "km", "unknown unit 'furlong'"),
    (-500, "C", "F", "below absolute zero"),
    (1e20, "m", "km", "beyond the converter's range"),
])
def test_unit_converter_refusals(value, source, target, words):
    with pytest.raises(ToolError, match=words.replace("(", r"\(").replace(")", r"\)")):
        convert(value, source, target)


def test_rounding_keeps_short_numbers():
    assert [rounded(x) for x in (3.10686, 2500.0, -0.0001, 0.0, 0.05, 123456.789)] == \
        ["3.11", "2500", "-0.0001", "0", "0.05", "123456.79"]


def test_date_arithmetic():
    assert days_between("2024-01-01", "2024-03-01") == "60 days"  # a leap year
    assert days_between("2023-01-01", "2023-03-01") == "59 days"
    assert days_between("2024-03-02", "2024-03-01") == "-1 day"
    assert weekday("2024-03-01") == "Friday" and weekday("1969-07-20") == "Sunday"
    for bad in ("2023-02-29", "01/02/2024", "2024-1-5", "yesterday", "10000-01-01"):
        with pytest.raises(ToolError, match="not a date written YYYY-MM-DD"):
            weekday(bad)


def test_lookup_reads_the_table_by_name_or_alias():
    assert lookup("France") == "Paris"
    assert lookup("france", "currency") == "euro"
    assert lookup("  the NETHERLANDS ", "continent") == "Europe"
    assert lookup("USA") == lookup("U.S.A.") == "Washington, D.C."
    assert lookup("UK", "calling_code") == "+44"
    with pytest.raises(ToolError, match="no country named 'Atlantis' in the table"):
        lookup("Atlantis")
    with pytest.raises(ToolError, match="unknown field 'anthem'"):
        lookup("France", "anthem")


# -- the registry -----------------------------------------------------------------------------

ECHO = ToolSpec("ECHO", "echo", {"type": "object", "required": ["text"],
                                 "properties": {"text": {"type": "string"},
                                                "times": {"type": "integer", "minimum": 1}}})


def echo(text, times=1):
    return text * times


def test_only_registered_tools_run():
    registry = shipped.registry()
    assert registry.run(Call("CALC", {"expression": "2 + 2"})).content == "4"
    result = registry.run(Call("ECHO", {"text": "hi"}))
    assert not result.ok and "unknown tool 'ECHO'" in result.content
    registry.register(ECHO, echo)
    assert registry.run(Call("ECHO", {"text": "hi", "times": 2})).content == "hihi"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(ECHO, echo)
    with pytest.raises(TypeError, match="not callable"):
        Registry().register(ECHO, "echo")


def test_bad_arguments_never_reach_the_tool():
    calls = []
    registry = Registry().register(ECHO, lambda **kw: calls.append(kw) or "ran")
    for arguments, words in [({}, "missing required argument 'text'"),
                             ({"text": "a", "times": 0}, "times must be at least 1"),
                             ({"text": "a", "loud": True}, "unexpected argument 'loud'"),
                             ({"text": 3}, "text must be of type string")]:
        result = registry.run(Call("ECHO", arguments))
        assert not result.ok and result.content.startswith("error: ") and words in result.content
    assert calls == []


def test_tool_errors_and_crashes_come_back_as_results():
    def refuse(text, times=1):
        raise ToolError(f"cannot echo {text!r}")

    def crash(text, times=1):
        return {}["missing"]

    assert Registry().register(ECHO, refuse).run(Call("ECHO", {"text": "a"})).content == \
        "error: cannot echo 'a'"
    result = Registry().register(ECHO, crash).run(Call("ECHO", {"text": "a"}))
    assert not result.ok and result.content == "error: the tool failed: KeyError: 'missing'"
    shipped_result = shipped.registry().run(Call("CALC", {"expression": "1 / 0"}))
    assert not shipped_result.ok and shipped_result.content == "error: division by zero"


def test_outputs_that_are_not_text_are_json():
    registry = Registry().register(ECHO, lambda text, times=1: {"echo": text, "n": times})
    assert registry.run(Call("ECHO", {"text": "a"})).content == '{"echo": "a", "n": 1}'


def test_huge_outputs_are_truncated_and_marked():
    registry = Registry(max_chars=100).register(ECHO, echo)
    result = registry.run(Call("ECHO", {"text": "x", "times": 10 ** 6}))
    assert result.ok and result.truncated
    assert result.content.startswith("x" * 100 + "\n[truncated: the output has 1000000 characters")
    assert len(result.content) < 200


def test_a_slow_tool_times_out_in_a_thread():
    def slow(text, times=1):
        time.sleep(3)
        return text

    registry = Registry(timeout=0.2).register(ECHO, slow)
    started = time.perf_counter()
    result = registry.run(Call("ECHO", {"text": "a"}))
    assert time.perf_counter() - started < 1.5
    assert not result.ok and result.content == "error: ECHO did not finish within 0.2 s"


def spin(text, times=1):
    while True:
        pass


def test_a_runaway_tool_is_killed_in_a_process():
    registry = Registry(timeout=0.5, isolation="process").register(ECHO, spin)
    started = time.perf_counter()
    result = registry.run(Call("ECHO", {"text": "a"}))
    assert time.perf_counter() - started < 3
    assert not result.ok and "did not finish within 0.5 s" in result.content
    assert multiprocessing.active_children() == []
    # the same registry still answers, and a process tool returns its output
    fine = Registry(isolation="process").register(ECHO, echo)
    assert fine.run(Call("ECHO", {"text": "ab", "times": 2})).content == "abab"


def test_registry_settings_are_checked():
    with pytest.raises(ValueError, match="isolation='vm'"):
        Registry(isolation="vm")
    with pytest.raises(ValueError, match="must be positive"):
        Registry(timeout=0)

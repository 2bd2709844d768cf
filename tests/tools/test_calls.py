"""The call syntaxes: writing calls, reading them back, and the failure class of each way a call
goes wrong."""

import pytest
from hypothesis import given, settings, strategies as st

from promptbake.tools import Call, ToolSpec, format_call, parse
from promptbake.tools.calls import MALFORMED, NO_CALL, UNKNOWN_TOOL

CALC = ToolSpec("CALC", "arithmetic", {"type": "object", "required": ["expression"],
                                       "properties": {"expression": {"type": "string"}}})
CONVERT = ToolSpec("CONVERT", "units", {
    "type": "object", "required": ["value", "from_unit", "to_unit"],
    "properties": {"value": {"type": "number"},
                   "from_unit": {"type": "string", "enum": ["km", "mi"]},
                   "to_unit": {"type": "string", "enum": ["km", "mi"]}}})
LOOKUP = ToolSpec("LOOKUP", "facts", {
    "type": "object", "required": ["country"],
    "properties": {"country": {"type": "string"},
                   "field": {"type": "string", "enum": ["capital", "currency"]},
                   "exact": {"type": "boolean"}}})
SPECS = [CALC, CONVERT, LOOKUP]


@pytest.mark.parametrize("text, calls", [
    ("CALC(17 * 23)", [Call("CALC", {"expression": "17 * 23"})]),
    ("CALC(2 * (3 + 4))", [Call("CALC", {"expression": "2 * (3 + 4)"})]),
    ('CALC("17 * 23")', [Call("CALC", {"expression": "17 * 23"})]),
    ("CALC(expression=17*23)", [Call("CALC", {"expression": "17*23"})]),
    ("  `CALC(1 + 1)`  ", [Call("CALC", {"expression": "1 + 1"})]),
    ("CONVERT(5, km, mi)", [Call("CONVERT", {"value": 5, "from_unit": "km", "to_unit": "mi"})]),
    ("CONVERT(2.5, to_unit=mi, from_unit=km)",
     [Call("CONVERT", {"value": 2.5, "to_unit": "mi", "from_unit": "km"})]),
    ('LOOKUP("Congo, Republic", capital)',
     [Call("LOOKUP", {"country": "Congo, Republic", "field": "capital"})]),
    ("LOOKUP(Côte d'Ivoire)", [Call("LOOKUP", {"country": "Côte d'Ivoire"})]),
    ("LOOKUP(United Kingdom, currency, true)",
     [Call("LOOKUP", {"country": "United Kingdom", "field": "currency", "exact": True})]),
    ("CALC(17 * 23) = 391", [Call("CALC", {"expression": "17 * 23"})]),  # an invented result
    ("CALC(1 + 1)\nCONVERT(3, mi, km)", [Call("CALC", {"expression": "1 + 1"}),
                                         Call("CONVERT", {"value": 3, "from_unit": "mi",
                                                          "to_unit": "km"})]),
])
def test_compact_calls_are_read(text, calls):
    parsed = parse(text, SPECS)
    assert parsed.calls == calls and parsed.failure is None and parsed.called


def test_compact_call_ends_where_the_result_goes():
    parsed = parse("CALC(17 * 23) = 391, I think.\nMore text.", SPECS)
    assert parsed.text[:parsed.end] == "CALC(17 * 23)"


@pytest.mark.parametrize("text", [
    "The answer is 391.",
    "Sure: CALC(1 + 1)",  # prose before the call: not a call in the compact syntax
    "I would use CALC for this.",
    "",
])
def test_text_without_a_call_is_no_call(text):
    parsed = parse(text, SPECS)
    assert parsed.failure == NO_CALL and not parsed.called and parsed.calls == []


@pytest.mark.parametrize("text, failure, words", [
    ("CALC(17 * 23", MALFORMED, "never closed"),
    ("CONVERT(5, km,, mi)", MALFORMED, "empty argument"),
    ("CONVERT(value=5, km, mi)", MALFORMED, "positional argument"),
    ("CONVERT(5, value=6, to_unit=mi)", MALFORMED, "given twice"),
    ("SEARCH(cats)", UNKNOWN_TOOL, "unknown tool 'SEARCH'"),
    ("calc(1 + 1)", UNKNOWN_TOOL, "unknown tool 'calc'"),  # names are case sensitive (BFCL)
    ("CONVERT(5, km)", "missing_argument", "to_unit"),
    ("CONVERT(5, km, mi, fast)", "extra_argument", "argument 4"),
    ("CONVERT(5, km, mi, speed=2)", "extra_argument", "speed"),
    ("CONVERT(five, km, mi)", "mistyped_argument", "number"),
    ('CONVERT("5", km, mi)', "mistyped_argument", "number"),
    ("CONVERT(5, kilometers, mi)", "out_of_range", "one of km, mi"),
    ("LOOKUP(France, capital, yes)", "mistyped_argument", "boolean"),
])
def test_failures_are_classified(text, failure, words):
    parsed = parse(text, SPECS)
    assert parsed.called and parsed.failure == failure
    assert words in parsed.message


def test_json_calls_are_read_and_classified():
    text = 'Let me check. <tool_call>{"name": "CONVERT", "arguments": {"value": 5, ' \
           '"from_unit": "km", "to_unit": "mi"}}</tool_call>'
    assert parse(text, SPECS, "json").calls == [Call("CONVERT", {"value": 5, "from_unit": "km",
                                                                  "to_unit": "mi"})]
    # OpenAI's wire format (arguments as a JSON string), newlines, no closing tag at the end
    wire = '<tool_call>\n{"name": "CALC", "arguments": "{\\"expression\\": \\"2+2\\"}"}'
    assert parse(wire, SPECS, "json").calls == [Call("CALC", {"expression": "2+2"})]
    for text, failure in [('<tool_call>{"name": "CALC", "arguments": {"expression": </tool_call>',
                           MALFORMED),
                          ('<tool_call>{"arguments": {}}</tool_call>', MALFORMED),
                          ('<tool_call>{"name": "CALC", "arguments": {}} extra</tool_call>',
                           MALFORMED),
                          ('<tool_call>{"name": "WEB", "arguments": {}}</tool_call>', UNKNOWN_TOOL),
                          ('<tool_call>{"name": "CALC", "arguments": {}}</tool_call>',
                           "missing_argument"),
                          ("CALC(1 + 1)", NO_CALL)]:
        assert parse(text, SPECS, "json").failure == failure, text


def test_unknown_syntax_is_refused():
    with pytest.raises(ValueError, match="unknown call syntax 'xml'"):
        parse("CALC(1)", SPECS, "xml")


def test_format_call_writes_what_the_model_is_shown():
    assert format_call(Call("CALC", {"expression": "17 * 23"}), "compact",
                       CALC.parameters) == "CALC(17 * 23)"
    assert format_call(Call("CONVERT", {"value": 5, "from_unit": "km", "to_unit": "mi"}),
                       "compact", CONVERT.parameters) == "CONVERT(5, km, mi)"
    # a skipped optional argument turns the rest into name=value
    assert format_call(Call("LOOKUP", {"country": "Peru", "exact": False}), "compact",
                       LOOKUP.parameters) == "LOOKUP(Peru, exact=false)"
    # strings that would read as something else are quoted
    assert format_call(Call("LOOKUP", {"country": "12"}), "compact",
                       LOOKUP.parameters) == 'LOOKUP("12")'
    assert format_call(Call("CALC", {"expression": "1 + 1"}), "json") == \
        '<tool_call>{"name": "CALC", "arguments": {"expression": "1 + 1"}}</tool_call>'


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                max_size=20)


@settings(max_examples=200, deadline=None)
@given(country=_TEXT, field=st.sampled_from(["capital", "currency"]), exact=st.booleans(),
       syntax=st.sampled_from(["compact", "json"]), keep=st.lists(st.booleans(), min_size=2,
                                                                   max_size=2))
def test_formatted_calls_parse_back(country, field, exact, syntax, keep):
    arguments = {"country": country}
    if keep[0]:
        arguments["field"] = field
    if keep[1]:
        arguments["exact"] = exact
    call = Call("LOOKUP", arguments)
    parsed = parse(format_call(call, syntax, LOOKUP.parameters), SPECS, syntax)
    assert parsed.calls == [call] and parsed.failure is None

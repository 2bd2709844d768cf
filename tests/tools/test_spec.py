"""Tool specs: the schema subset, loading and saving (atomic, mirrored), and every refusal naming
the field that is wrong."""

import json

import pytest

from promptbake.tools import (
    Call,
    Example,
    SpecError,
    ToolSpec,
    check_arguments,
    load_specs,
    save_specs,
)
from promptbake.tools.schema import SchemaError, check_schema

PARAMETERS = {"type": "object", "required": ["city"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40},
                             "days": {"type": "integer", "minimum": 1, "maximum": 14},
                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                                      "default": "celsius"},
                             "date": {"type": "string", "pattern": r"\d{4}-\d{2}-\d{2}"},
                             "hours": {"type": "array", "items": {"type": "integer"},
                                       "maxItems": 3},
                             "where": {"type": "object", "required": ["lat"],
                                       "properties": {"lat": {"type": "number"}}}}}


def weather(**changes) -> dict:
    spec = {"name": "get_weather", "description": "The weather forecast for a city.",
            "parameters": PARAMETERS,
            "examples": [{"user": "Weather in Rome?", "calls": [
                {"name": "get_weather", "arguments": {"city": "Rome"}}],
                "results": ["sunny, 24 C"], "answer": "Sunny and 24 C in Rome."},
                {"user": "Hello!", "calls": [], "results": [], "answer": "Hello! How can I help?"}],
            "tests": [{"id": "w1", "prompt": "Weather in Oslo for 3 days?",
                       "expected": [{"name": "get_weather",
                                     "arguments": {"city": ["Oslo"], "days": [3]}}],
                       "checks": [{"type": "contains", "value": "Oslo"}]},
                      {"id": "w2", "prompt": "Tell me a joke.", "expected": []}]}
    spec.update(changes)
    return spec


@pytest.mark.parametrize("arguments, kinds", [
    ({"city": "Rome"}, []),
    ({"city": "Rome", "days": 3, "unit": "fahrenheit", "date": "2024-01-02", "hours": [1, 2],
      "where": {"lat": 41.9}}, []),
    ({}, ["missing_argument"]),
    ({"city": "Rome", "wind": True}, ["extra_argument"]),
    ({"city": 7}, ["mistyped_argument"]),
    ({"city": "Rome", "days": 3.0}, ["mistyped_argument"]),  # Python's types, as BFCL
    ({"city": "Rome", "days": True}, ["mistyped_argument"]),
    ({"city": "Rome", "days": 15}, ["out_of_range"]),
    ({"city": "Rome", "days": 0}, ["out_of_range"]),
    ({"city": "", "unit": "kelvin"}, ["out_of_range", "out_of_range"]),
    ({"city": "Rome", "date": "2 Jan 2024"}, ["out_of_range"]),
    ({"city": "Rome", "hours": [1, "2", 3, 4]}, ["out_of_range", "mistyped_argument"]),
    ({"city": "Rome", "where": {}}, ["missing_argument"]),
])
def test_arguments_are_checked_against_the_schema(arguments, kinds):
    assert [p.kind for p in check_arguments(PARAMETERS, arguments)] == kinds


def test_problems_name_the_argument():
    [problem] = check_arguments(PARAMETERS, {"city": "Rome", "hours": [1, "x"]})
    assert problem.path == "hours[1]" and "integer" in problem.message
    [problem] = check_arguments(PARAMETERS, {"city": "Rome", "where": {"lat": "n"}})
    assert problem.path == "where.lat"


@pytest.mark.parametrize("schema, words", [
    ({"type": "array"}, "must be {\"type\": \"object\""),
    ({"type": "object", "properties": {"x": {"type": "str"}}}, "properties.x.type: 'str'"),
    ({"type": "object", "properties": {"x": {"type": "string", "oneOf": []}}},
     "unsupported keyword(s) oneOf"),
    ({"type": "object", "required": ["y"], "properties": {"x": {"type": "string"}}},
     "['y'] are not in properties"),
    ({"type": "object", "properties": {"x": {"type": "string", "enum": []}}}, "non-empty list"),
    ({"type": "object", "properties": {"x": {"type": "integer", "enum": ["a"]}}},
     "are not of type 'integer'"),
    ({"type": "object", "properties": {"x": {"type": "number", "minimum": 5, "maximum": 1}}},
     "minimum 5 is above maximum 1"),
    ({"type": "object", "properties": {"x": {"type": "string", "pattern": "("}}},
     "not a regular expression"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "only true or false"),
])
def test_unsupported_schemas_are_refused_by_field(schema, words):
    with pytest.raises(SchemaError) as err:
        check_schema(schema, "tool 'x': parameters")
    assert words in str(err.value) and "tool 'x': parameters" in str(err.value)


def test_specs_round_trip_through_json(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(weather()))
    [spec] = load_specs(path)
    assert spec.examples[0].calls == [Call("get_weather", {"city": "Rome"})]
    assert spec.examples[1].calls == [] and spec.tests[1]["expected"] == []
    save_specs([spec], tmp_path / "saved.json")
    assert load_specs(tmp_path / "saved.json") == [spec]
    assert json.loads((tmp_path / "saved.json").read_text())["tools"][0] == spec.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.json", "tools.json"]


def test_a_list_or_a_single_spec_loads_and_tests_may_live_in_a_jsonl_file(tmp_path):
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(t) + "\n" for t in weather()["tests"]))
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([weather(tests="w.jsonl")]))
    [spec] = load_specs(path)
    assert [t["id"] for t in spec.tests] == ["w1", "w2"]
    path.write_text(json.dumps(weather()))
    assert load_specs(path)[0].name == "get_weather"


def test_saving_is_atomic(tmp_path, monkeypatch):
    from promptbake import files

    spec = ToolSpec.from_dict(weather())
    target = tmp_path / "tools.json"
    target.write_text("previous")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError):
        save_specs([spec], target)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["tools.json"]


@pytest.mark.parametrize("change, words", [
    ({"name": "get weather"}, "letters, digits and underscores"),
    ({"description": " "}, "description is missing or empty"),
    ({"parameters": {"type": "object", "properties": {"city": {"type": "text"}}}},
     "parameters.properties.city.type: 'text'"),
    ({"examples": [{"user": "Hi", "calls": [{"name": "get_weather", "arguments": {}}],
                    "results": ["x"], "answer": "y"}]}, "examples[0].calls[0]: missing required"),
    ({"examples": [{"user": "Hi", "calls": [{"name": "get_weather",
                                              "arguments": {"city": "A"}}],
                    "results": [], "answer": "y"}]}, "one result text per call"),
    ({"examples": [{"user": "Hi", "calls": [{"name": "web", "arguments": {}}],
                    "results": ["x"], "answer": "y"}]}, "calls 'web', which is not in the set"),
    ({"examples": [{"user": "", "answer": "y"}]}, "examples[0].user: missing or empty"),
    ({"tests": [{"id": "a", "prompt": "p"}]}, "'expected' must be a list"),
    ({"tests": [{"id": "a", "prompt": "p", "expected": [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]}]}, "list of allowed values"),
    ({"tests": [{"id": "a", "prompt": "p", "expected": [
        {"name": "get_weather", "arguments": {"city": ["Oslo"], "days": [40]}}]}]},
     "days must be at most 14"),
    ({"tests": [{"id": "a", "prompt": "p", "expected": [
        {"name": "get_weather", "arguments": {"city": ["Oslo", ""]}}]}]},
     "'city' is required, so '' (may be left out)"),
    ({"tests": [{"id": "a", "prompt": "p", "expected": [
        {"name": "get_time", "arguments": {}}]}]}, "calls 'get_time', which is not among"),
    ({"tests": [{"id": "a", "prompt": "p", "expected": [],
                 "checks": [{"type": "mentions_number", "value": "7"}]}]}, "a number 'value'"),
    ({"tests": [{"id": "a", "prompt": "p", "expected": [], "checks": [{"type": "rhymes"}]}]},
     "needs a 'type' among"),
    ({"tests": [{"id": "a", "prompt": "p", "expected": []},
                {"id": "a", "prompt": "q", "expected": []}]}, "repeat item ids"),
    ({"colour": "red"}, "unknown field(s) colour"),
])
def test_loading_errors_name_the_field(tmp_path, change, words):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": [weather(**change)]}))
    with pytest.raises(SpecError) as err:
        load_specs(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_a_spec_without_a_name_is_refused(tmp_path):
    path = tmp_path / "tools.json"
    data = weather()
    del data["name"]
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"tools\[0\]: missing 'name'"):
        load_specs(path)


def test_duplicate_tool_names_in_a_set_are_refused(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": [weather(), weather()]}))
    with pytest.raises(SpecError, match=r"duplicate tool names \['get_weather'\]"):
        load_specs(path)


@pytest.mark.parametrize("text, words", [("{", "not JSON"), ("[]", "non-empty list"),
                                          ("7", "non-empty list")])
def test_unreadable_files_are_refused(tmp_path, text, words):
    path = tmp_path / "tools.json"
    path.write_text(text)
    with pytest.raises(SpecError, match=words):
        load_specs(path)
    with pytest.raises(SpecError, match="not found"):
        load_specs(tmp_path / "missing.json")


def test_example_objects_are_plain_data():
    example = Example("Hi", [], [], "Hello")
    assert Example.from_dict(example.to_dict(), "x") == example

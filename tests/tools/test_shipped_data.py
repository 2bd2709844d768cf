"""The shipped tool data: enough held-out items, training contexts and demonstrations that share
nothing with them, expected calls that the tools run to the expected answers, and files that
are exactly what the generator writes."""

import importlib.util
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from promptbake import contexts
from promptbake.tools import Call, format_call, match, parse, shipped
from promptbake.tools.evaluation import answer_passes

DATA = Path(str(resources.files("promptbake").joinpath("data/tools")))


@pytest.fixture(scope="module")
def specs():
    return shipped.specs()


def test_enough_held_out_items_of_every_kind(specs):
    tool_items = [i for s in specs for i in s.tests]
    no_tool = shipped.no_tool_items()
    assert len(tool_items) >= 200 and len(no_tool) >= 50
    assert all(s.tests for s in specs) and all(not i["expected"] for i in no_tool)
    ids = [i["id"] for i in tool_items + no_tool]
    assert len(set(ids)) == len(ids)
    first = shipped.test_items()[:40]  # what a quick measurement uses holds every kind
    kinds = {i["expected"][0]["name"] if i["expected"] else None for i in first}
    assert kinds == {s.name for s in specs} | {None}


def test_training_contexts_and_demonstrations_share_nothing_with_the_test_items(specs):
    held_out = [i["prompt"] for i in shipped.test_items()]
    train = [c[0]["content"] for c in shipped.train_contexts()]
    assert len(train) >= 150 and all(len(c) == 1 for c in shipped.train_contexts())
    assert contexts.near_duplicates(train, held_out) == []
    demonstrations = [e.user for s in specs for e in s.examples]
    assert contexts.near_duplicates(demonstrations, held_out) == []
    assert len({t.lower() for t in train}) == len(train)


def test_training_and_test_wordings_are_different_templates():
    generate = _generator()
    pairs = [(generate.TRAIN_CONVERT, generate.TEST_CONVERT), (generate.TRAIN_DAYS,
             generate.TEST_DAYS), (generate.TRAIN_WEEKDAY, generate.TEST_WEEKDAY)]
    pairs += [(generate.TRAIN_CALC[k], generate.TEST_CALC[k]) for k in generate.TEST_CALC]
    pairs += [(generate.TRAIN_LOOKUP[k], generate.TEST_LOOKUP[k]) for k in generate.TEST_LOOKUP]
    def words(template):  # placeholders alike, case and final punctuation dropped
        return re.sub(r"\{[abc]\}", "{n}", template.lower()).rstrip(".?!").split()

    for train, test in pairs:
        assert len(train) >= 4  # varied enough that the bake learns the kind, not the wording
        for one in train:
            for other in test:  # not the same wording, one inside the other, or reordered
                a, b = " ".join(words(one)), " ".join(words(other))
                assert a not in b and b not in a, (one, other)
                assert sorted(words(one)) != sorted(words(other)), (one, other)
    # the training questions are mostly tool questions, with others among them
    rows = shipped.train_rows()
    assert 0.15 < sum(r["tool"] is None for r in rows) / len(rows) < 0.35


def test_every_expected_call_runs_to_the_expected_answer(specs):
    registry = shipped.registry()
    for item in shipped.test_items():
        for expected in item["expected"]:
            arguments = {k: next(v for v in allowed if v != "")
                         for k, allowed in expected["arguments"].items()
                         if any(v != "" for v in allowed)}
            result = registry.run(Call(expected["name"], arguments))
            assert result.ok, (item["id"], result.content)
            assert answer_passes(item["checks"], result.content), (item["id"], result.content)
            if "result" in item:
                assert result.content == item["result"]


def test_every_allowed_call_is_written_read_and_matched(specs):
    schemas = {s.name: s.parameters for s in specs}
    for item in shipped.test_items():
        for expected in item["expected"]:
            for i in range(max(len(v) for v in expected["arguments"].values())):
                arguments = {k: allowed[min(i, len(allowed) - 1)]
                             for k, allowed in expected["arguments"].items()}
                call = Call(expected["name"], {k: v for k, v in arguments.items() if v != ""})
                for syntax in ("compact", "json"):
                    parsed = parse(format_call(call, syntax, schemas[call.name]), specs, syntax)
                    assert parsed.calls == [call], (item["id"], syntax)
                    assert match(parsed.calls, [expected], specs).valid, (item["id"], call)


def _generator():
    spec = importlib.util.spec_from_file_location("generate", DATA / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


def test_the_shipped_files_are_what_the_generator_writes():
    for name, text in _generator().build().items():
        assert (DATA / name).read_text("utf-8") == text, name


def test_the_table_is_plain_json_with_every_field(specs):
    table = json.loads((DATA / "countries.json").read_text("utf-8"))
    assert len(table) >= 80
    assert all(set(row) - {"aliases"} == {"capital", "currency", "continent", "calling_code"}
               for row in table.values())


def test_every_spec_has_its_shipped_test_file(specs):
    folder = resources.files("promptbake").joinpath("data/tools/tests")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl"))
    assert names == sorted(f"{s.name}.jsonl" for s in specs)

import json

import pytest

from promptbake import contexts, drift
from promptbake.contexts import ContextError
from promptbake.tasks import TASKS, load_task


def test_builtin_contexts_split_into_disjoint_parts():
    train, held_out = contexts.builtin("train"), contexts.builtin("held_out")
    assert len(train) + len(held_out) >= 200 and len(held_out) >= 40
    as_text = lambda cs: {c[0]["content"] for c in cs}
    assert not as_text(train) & as_text(held_out)
    assert contexts.builtin("train") == train  # deterministic
    assert all(c[0]["role"] == "user" and c[0]["content"] for c in train)


def test_builtin_kinds_are_interleaved_and_checked():
    general = contexts.builtin("held_out", kinds=("general",))
    short = contexts.builtin("held_out", kinds=("short",))
    both = contexts.builtin("held_out")
    assert sorted(map(str, both)) == sorted(map(str, general + short))  # the split is per context
    first = [c[0]["content"] for c in both[:24]]  # what a bake measures on holds both kinds
    assert {c[0]["content"] for c in general} & set(first)
    assert {c[0]["content"] for c in short} & set(first)
    with pytest.raises(ValueError, match="choose one or more of general, short"):
        contexts.builtin("train", kinds=("long",))


def test_no_builtin_context_is_a_task_item_or_a_drift_turn():
    # A context the bake trains on must not be what a task or the drift benchmark measures with:
    # not the same sum in other words, not the same question or review reworded.
    shipped = contexts.builtin_messages()
    assert len({c.lower() for c in shipped}) == len(shipped)
    items = [item["prompt"] for name in TASKS for item in load_task(name).items]
    turns = [t for lines in drift.user_turns().values() for t in lines]
    assert contexts.near_duplicates(shipped, items + turns) == []


@pytest.mark.parametrize("text, other", [
    ("What is 8 * 6?", "Calculate 6 times 8."),
    ("What is 9 * 9?", "What is 9 squared?"),
    ("How much is 85 minus 29?", "What is 85 - 29?"),
    ("What's the best way to learn a new language?", "What is the best way to learn a language?"),
    ('Is this review positive? "The staff went out of their way to make our stay special. '
     'Wonderful hotel."',
     'Positive or negative: "The hotel staff went out of their way to help us."'),
])
def test_near_duplicates_finds_the_same_question_reworded(text, other):
    [(found, like, similarity)] = contexts.near_duplicates([text], [other])
    assert (found, like) == (text, other) and 0.5 <= similarity <= 1


@pytest.mark.parametrize("text, other", [
    ("What is 85 - 29?", "What is 29 - 85?"),  # a difference keeps its order
    ("What is 6 * 8?", "What is 6 + 8?"),
    ("What is the capital of Chile?", "What is the capital of Peru?"),  # one template, two items
    ("Work out 24 * 15.", "How does a thermometer work?"),  # one shared word is not enough
])
def test_near_duplicates_leaves_different_questions(text, other):
    assert contexts.near_duplicates([text], [other]) == []


@pytest.mark.parametrize("text, key", [
    ("What is 8 * 6?", ("*", 6, 8)),
    ("Multiply 6 by 8.", ("*", 6, 8)),
    ("What is the product of 8 and 6?", ("*", 6, 8)),
    ("What is 12 squared?", ("*", 12, 12)),
    ("What is 85 - 29?", ("-", 85, 29)),
    ("What is 85-29?", ("-", 85, 29)),
    ("Subtract 29 from 85.", ("-", 85, 29)),  # the words put the operands the other way round
    ("Divide 48 by 6.", ("/", 48, 6)),
    ("How many times does 6 go into 48?", ("/", 48, 6)),
    ("Plan a 3-day trip for 2 people.", None),  # a hyphen, not a minus
    ("Add 17, 23 and 41.", None),  # three numbers: not a two-operand sum
    ("What is 2 plus 3 times 4?", None),  # two operators
])
def test_arithmetic_key(text, key):
    assert contexts.arithmetic_key(text) == key


def test_near_duplicates_checks_its_arguments_and_lets_sums_decide():
    # the same words around different sums are different questions
    assert contexts.near_duplicates(["Calculate 6 times 8 quickly, please."],
                                    ["Calculate 7 times 9 quickly, please."]) == []
    assert contexts.content_words("Who's Newton's friend? It wasn't me.") == {"friend", "newton"}
    for bad in ({"threshold": 0.0}, {"threshold": 1.5}, {"min_shared": 0}):
        with pytest.raises(ValueError, match="Jaccard"):
            contexts.near_duplicates(["a"], ["b"], **bad)
    with pytest.raises(ValueError, match="each once"):
        contexts.builtin("train", kinds=("general", "general"))


def test_jsonl_forms(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = ['"plain string"', '{"user": "an object"}',
             json.dumps({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"},
                                      {"role": "user", "content": "and now?"}]}), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    found = contexts.load(path)
    assert found[0] == [{"role": "user", "content": "plain string"}]
    assert found[1] == [{"role": "user", "content": "an object"}]
    assert [m["role"] for m in found[2]] == ["user", "assistant", "user"]


def test_text_file_one_message_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first question\n\nsecond question\n", encoding="utf-8")
    assert [c[0]["content"] for c in contexts.load(path)] == ["first question", "second question"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"\n  \n", "has no contexts"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8 text \\(line 1\\)"),
    ("bad.jsonl", b'"ok"\n{"user": \n', "line 2: not valid JSON"),
    ("roles.jsonl", b'{"messages": [{"role": "system", "content": "x"}]}\n', "role"),
    ("last.jsonl", b'{"messages": [{"role": "user", "content": "a"}, '
                   b'{"role": "assistant", "content": "b"}]}\n', "last message must be the user"),
    ("shape.jsonl", b'[1, 2]\n', "expected a string or an object"),
])
def test_bad_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ContextError, match=message):
        contexts.load(path)


def test_missing_file():
    with pytest.raises(ContextError, match="not found"):
        contexts.load("/nonexistent/contexts.jsonl")


def test_resolve():
    assert contexts.resolve("none") == [[]]
    small = contexts.resolve(["a", "b"], "train")
    assert small == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert contexts.resolve(["a", "b"], "held_out") == contexts.builtin("held_out")
    many = [f"question {i}" for i in range(50)]
    train, held = contexts.resolve(many, "train"), contexts.resolve(many, "held_out")
    assert len(train) + len(held) == 50 and held and not {str(c) for c in train} & {str(c) for c in held}


def test_split_never_leaves_a_part_empty():
    for start in range(0, 400, 10):  # many small sets: the hash alone would empty one part
        ten = [f"message {i}" for i in range(start, start + 10)]
        train, held = contexts.resolve(ten, "train"), contexts.resolve(ten, "held_out")
        assert train and held and len(train) + len(held) == 10


def test_for_bake_and_for_measuring():
    assert contexts.for_bake("none", "train", 5) == [[]] * 5  # each empty context sampled anew
    train = contexts.for_bake(None, "train", 20, seed=3)
    assert len(train) == 20 and train == contexts.for_bake(None, "train", 20, seed=3)
    assert train != contexts.for_bake(None, "train", 20, seed=4)
    assert contexts.for_bake(None, "held_out", 7) == contexts.builtin("held_out")[:7]
    assert contexts.for_measuring("builtin", 3) == contexts.builtin("held_out")
    assert contexts.for_measuring(["a", "b"], 3) == [[{"role": "user", "content": "a"}],
                                                     [{"role": "user", "content": "b"}]]


def test_the_probe_set_holds_eight_kinds_none_of_them_trained_or_evaluated_on():
    probes = contexts.probe()
    kinds = contexts.probe_kinds()
    assert len(probes) == 48 and len(kinds) == 8
    assert contexts.probe(8) == probes[:8]
    assert any(len(c) == 3 for c in probes[:8])  # a multi-turn follow-up among the first kinds
    texts = [" ".join(m["content"] for m in c) for c in probes]
    items = [item["prompt"] for name in TASKS for item in load_task(name).items]
    turns = [t for lines in drift.user_turns().values() for t in lines]
    assert contexts.near_duplicates(texts, items + turns + contexts.builtin_messages()) == []
    assert contexts.for_measuring("probe", 24) == probes


def test_pools_draw_by_weight_and_record_the_mix(tmp_path):
    pools = contexts.Pools("general=3,short=1")
    train = pools.draw("train", 8, seed=0)
    general = {c[0]["content"] for c in contexts.builtin("train", ("general",))}
    assert sum(c[0]["content"] in general for c in train) == 6 and len(train) == 8
    assert pools.draw("train", 8, seed=0) == train and pools.draw("train", 8, seed=1) != train
    held_out = pools.draw("held_out", 4)
    assert pools.mix() == {"general": {"weight": 3.0, "train": 6, "held_out": 3},
                           "short": {"weight": 1.0, "train": 2, "held_out": 1}}
    assert str(pools) == "general=3,short=1" and len(held_out) == 4
    # a small file is all training: its held-out share goes to the other pools
    small = tmp_path / "mine.txt"
    small.write_text("first question of mine\nsecond question of mine\n")
    pools = contexts.Pools({"short": 1, str(small): 1})
    assert [c[0]["content"] for c in pools.draw("train", 4)][-2:] == [
        "first question of mine", "second question of mine"]
    assert len(pools.draw("held_out", 4)) == 4 and pools.mix()[str(small)]["held_out"] == 0
    assert contexts.for_bake(pools, "held_out", 4) == pools.draw("held_out", 4)


@pytest.mark.parametrize("spec, message", [
    ("general=-1,short=1", "weights are finite numbers >= 0"),
    ("general=0,short=0", "sum to 0"),
    ("general=1,general=2", "named twice"),
    ("general=lots", "is not a number"),
    ("general=1,,=2", "NAME=WEIGHT pairs"),
    ("probe=1", "the probe set measures off-distribution KL"),
    ("everything=1", "unknown context pool 'everything'"),
    ("generated-domain:x=1", "N in generated-domain:N"),
])
def test_bad_pool_specs_are_named(spec, message):
    with pytest.raises(ContextError, match=message):
        contexts.Pools(spec)


def test_an_empty_pool_is_refused(tmp_path):
    pools = contexts.Pools("generated-general=1,short=1")
    assert pools.generated() == {"generated-general": None}
    with pytest.raises(ContextError, match="'generated-general' is empty"):
        pools.fill("generated-general", [])
    with pytest.raises(ContextError, match="was not generated"):
        pools.draw("train", 4)

import json

import pytest

from promptbake import contexts
from promptbake.contexts import ContextError


def test_builtin_contexts_split_into_disjoint_parts():
    train, held_out = contexts.builtin("train"), contexts.builtin("held_out")
    assert len(train) + len(held_out) >= 200 and len(held_out) >= 40
    as_text = lambda cs: {c[0]["content"] for c in cs}
    assert not as_text(train) & as_text(held_out)
    assert contexts.builtin("train") == train  # deterministic
    assert all(c[0]["role"] == "user" and c[0]["content"] for c in train)


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

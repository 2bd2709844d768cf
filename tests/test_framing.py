import copy
import logging

import pytest

from promptbake.framing import Framing, FramingError, align

CTX = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_framing_is_the_deployed_input(tokenizer, prompt):
    f = Framing(tokenizer, prompt)
    assert f.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    teacher, student = f.teacher_text(CTX), f.student_text(CTX)
    assert prompt in teacher and prompt not in student
    assert f.default_system in student  # what the model sees without a system prompt
    assert student == tokenizer.apply_chat_template(CTX, tokenize=False, add_generation_prompt=True)
    f.check(CTX)
    assert f.teacher_ids(CTX)[-3:] == f.student_ids(CTX)[-3:]  # the assistant header


@pytest.mark.parametrize("framing,has_system,has_default", [
    ("empty", True, False), ("none", False, False), ("default", True, True)])
def test_student_framings(tokenizer, framing, has_system, has_default, prompt):
    f = Framing(tokenizer, prompt, framing)
    text = f.student_text(CTX)
    assert ("<|im_start|>system" in text) == has_system
    assert (f.default_system in text) == has_default
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    f.check(CTX)


def test_multi_turn_and_unconditional_contexts(tokenizer, prompt):
    f = Framing(tokenizer, prompt)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"},
               {"role": "user", "content": "Where are we sailing?"}]
    f.check(history)
    assert "Ahoy!" in f.student_text(history)
    f.check([])  # unconditional: no user turn at all


def test_tokenizer_without_template_falls_back_to_plain_text(tokenizer, caplog, prompt):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with caplog.at_level(logging.WARNING, logger="promptbake"):
        f = Framing(plain, prompt)
    assert "no chat template" in caplog.text
    assert f.teacher_text(CTX) == prompt + "\n\n" + CTX[0]["content"] + "\n"
    assert f.student_text(CTX) == CTX[0]["content"] + "\n"
    f.check(CTX)


def test_template_that_drops_system_messages_is_refused(tokenizer, prompt):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(FramingError, match="ignores system messages"):
        Framing(odd, prompt)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(tokenizer, prompt):
    with pytest.raises(FramingError, match="prompt is empty"):
        Framing(tokenizer, prompt)


def test_unknown_framing_is_refused(tokenizer, prompt):
    with pytest.raises(FramingError, match="unknown student framing 'system'"):
        Framing(tokenizer, prompt, "system")


def test_align_places_the_same_response_on_both_sides():
    t, s, t0, s0 = align([1, 2, 3, 4], [1, 2], [7, 8, 9])
    assert t[t0:] == s[s0:] == [7, 8, 9] and (t0, s0) == (4, 2)
    with pytest.raises(FramingError, match="at least one prefix token"):
        align([], [1], [5])
    with pytest.raises(FramingError):
        align([1], [1], [])


DEMO = [{"role": "system", "content": "Use CALC(expression) for arithmetic."},
        {"role": "user", "content": "What is 17 times 23?"},
        {"role": "assistant", "content": "CALC(17 * 23)"},
        {"role": "user", "content": "Result: 391"},
        {"role": "assistant", "content": "17 times 23 is 391."}]


def test_a_conversation_prompt_is_on_the_teacher_side_only(tokenizer):
    f = Framing(tokenizer, DEMO)
    teacher, student = f.teacher_text(CTX), f.student_text(CTX)
    for message in DEMO:
        assert message["content"] in teacher and message["content"] not in student
    assert teacher.index("17 times 23 is 391.") < teacher.index(CTX[0]["content"])
    assert f.teacher_messages(CTX) == DEMO + CTX
    f.check(CTX)
    # the response follows the same assistant header on both sides
    assert teacher.endswith("<|im_start|>assistant\n") and student.endswith(
        "<|im_start|>assistant\n")


def test_prompt_text_is_canonical_and_conversations_are_checked(tokenizer):
    from promptbake.framing import prompt_messages, prompt_text

    assert prompt_text("Be brief.") == "Be brief."
    assert prompt_text(DEMO) == prompt_text([dict(reversed(list(m.items()))) for m in DEMO])
    assert prompt_messages("Be brief.") == [{"role": "system", "content": "Be brief."}]
    for bad, match in (([], "empty list of chat messages"),
                       ([{"role": "robot", "content": "x"}], "role"),
                       ([{"role": "user"}], "content"), ([{"role": "user", "content": " "}],
                                                         "every message of the prompt is empty"),
                       (3, "not int")):
        with pytest.raises(FramingError, match=match):
            Framing(tokenizer, bad)


def test_a_conversation_in_an_order_no_chat_holds_is_refused(tokenizer):
    from promptbake.engine import demonstrations_in
    from promptbake.framing import prompt_messages

    user, assistant = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr."}
    system, tool = {"role": "system", "content": "Be a pirate."}, {"role": "tool", "content": "42"}
    for bad, match in (([user], "ends with a user message"),
                       ([system, user, assistant, user], "ends with a user message"),
                       ([system, tool], "message 1 is a tool result that follows no assistant"),
                       ([assistant, system], r"message 1 is a system message after message 0 "
                                             r"\(assistant\)"),
                       ([system, user, user, assistant], "messages 1 and 2 are both user turns"),
                       ([system, user, assistant, assistant], "2 and 3 are both assistant"),
                       ([system, user, assistant, tool, user, assistant],
                        "message 4 is a user turn right after a tool result")):
        with pytest.raises(FramingError, match=match):
            prompt_messages(bad)
        Framing(tokenizer, bad)  # a bake made before the rule still loads
    # what chats hold: system texts first, an opening assistant greeting, calls answered after
    # one or more results; and the engine's edits (demonstrations reordered or dropped) keep it
    calls = [system, system, user, assistant, tool, tool, assistant, user, assistant]
    for good in ([system], [assistant], calls, DEMO):
        prompt_messages(good)
        Framing(tokenizer, good).check(CTX)
    head, demos = demonstrations_in(calls)
    for edited in (head + demos[1] + demos[0], head + demos[1], head + demos[0]):
        prompt_messages(edited)


def test_a_context_given_as_text_is_one_user_message(tokenizer, prompt):
    f = Framing(tokenizer, prompt)
    as_messages = [{"role": "user", "content": "What is 2+2?"}]
    assert f.teacher_ids("What is 2+2?") == f.teacher_ids(as_messages)
    assert f.student_ids("What is 2+2?") == f.student_ids(as_messages)
    f.check("What is 2+2?")


def test_a_template_that_drops_a_demonstration_turn_is_refused(tokenizer):
    odd = copy.deepcopy(tokenizer)
    # renders system and user turns but drops assistant turns that come before the last user turn
    odd.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}"
                         "<{{ m['role'] }}>{{ m['content'] }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    f = Framing(odd, DEMO)
    with pytest.raises(FramingError, match="dropped it"):
        f.check(CTX)

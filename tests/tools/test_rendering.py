"""The prompt u for a set of tools: with SmolLM2's template (no tools support, any role
rendered), with a template that documents tools itself, with one that puts them elsewhere or
refuses the tool role, and without a template."""

import copy
import itertools

import pytest

from promptbake.tools import (
    Call,
    Example,
    ToolSpec,
    parse,
    render,
    result_role,
    shipped,
    supports_tools,
    tool_turns,
)
from promptbake.tools.rendering import RESULT_MARKER, documentation

WEATHER = ToolSpec("get_weather", "The weather in a city.", {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"},
                   "unit": {"type": "string", "enum": ["C", "F"], "default": "C"}}},
    examples=[Example("Weather in Rome?", [Call("get_weather", {"city": "Rome"})],
                      ["sunny, 24 C"], "Sunny and 24 C in Rome."),
              Example("Hello!", [], [], "Hello! How can I help?")])

# Qwen2.5's way of documenting tools, shortened: inside the system turn, calls as JSON inside
# <tool_call> tags, results in a user turn inside <tool_response> tags
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '\\n</tools>\\nCall a function with <tool_call>\\n{\"name\": <name>, "
    "\"arguments\": <args>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls)"
    " %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- for call in message.tool_calls %}{%- set call = call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{{- call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama 3.1's way: the tools go with the last user message, outside the system turn
TOOLS_IN_USER_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.last and tools %}TOOLS {{ tools | tojson }}"
    "{%- endif %}<{{ message.role }}>{{ message.content }}</{{ message.role }}>{%- endfor %}"
    "{%- if add_generation_prompt %}<assistant>{%- endif %}")
NO_TOOL_ROLE_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{%- endif %}"
    "<|im_start|>{{ message.role }}\\n{{ message.content }}<|im_end|>\\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\\n{%- endif %}")


def with_template(tokenizer, template):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def test_smollm2_template_knows_no_tools_but_renders_a_tool_turn(tokenizer):
    assert not supports_tools(tokenizer)
    assert result_role(tokenizer) == "tool"


def test_compact_rendering_is_a_system_message_and_real_turns(tokenizer):
    messages = render([WEATHER], tokenizer)
    assert [m["role"] for m in messages] == ["system", "user", "assistant",  # no call first
                                             "user", "assistant", "tool", "assistant"]
    system = messages[0]["content"]
    assert "written NAME(arguments) as in the examples" in system
    assert "get_weather(city, unit?)" in system
    assert "unit: one of C, F (default C)" in system
    assert messages[3:] == [{"role": "user", "content": "Weather in Rome?"},
                            {"role": "assistant", "content": "get_weather(Rome)"},
                            {"role": "tool", "content": "sunny, 24 C"},
                            {"role": "assistant", "content": "Sunny and 24 C in Rome."}]
    # what the integration does: the user's context after u, through the template
    text = tokenizer.apply_chat_template(messages + [{"role": "user", "content": "Oslo?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text.count("<|im_start|>system") == 1 and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>tool\nsunny, 24 C<|im_end|>" in text


def test_results_as_user_turns_keep_user_and_assistant_alternating(tokenizer):
    messages = render([WEATHER], tokenizer, results="user")
    roles = [m["role"] for m in messages[1:]]
    assert all(a != b for a, b in itertools.pairwise(roles))
    assert {"role": "user", "content": f"{RESULT_MARKER} sunny, 24 C"} in messages
    assert tool_turns(["1", "2"], "user") == [{"role": "user", "content":
                                               f"{RESULT_MARKER} 1\n{RESULT_MARKER} 2"}]
    assert tool_turns(["1", "2"], "tool") == [{"role": "tool", "content": "1"},
                                              {"role": "tool", "content": "2"}]


def test_demonstrations_can_go_inside_the_system_message(tokenizer):
    [system] = render([WEATHER], tokenizer, "json", demonstrations="system")
    assert system["role"] == "system"
    assert "Examples:\nUser: Hello!\nAssistant: Hello! How can I help?" in system["content"]
    assert ('Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
            f'</tool_call>\n{RESULT_MARKER} sunny, 24 C') in system["content"]


def test_the_json_rendering_without_tools_support_uses_promptbake_documentation(tokenizer):
    messages = render([WEATHER], tokenizer, "json")
    assert '{"name": "get_weather", "description"' in messages[0]["content"]
    call = messages[4]["content"]
    assert parse(call, [WEATHER], "json").calls == [Call("get_weather", {"city": "Rome"})]


def test_a_tools_aware_template_documents_and_demonstrates_in_its_own_format(tokenizer):
    aware = with_template(tokenizer, TOOLS_TEMPLATE)
    assert supports_tools(aware) and result_role(aware) == "tool"
    messages = render([WEATHER], aware, "json", instruction="Be brief.")
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools\n<tools>\n") and '"get_weather"' in system
    assert messages[4]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                        "arguments": {"city": "Rome"}}
    # rendered without tools=, the messages give exactly what the template gives with them
    chat = [{"role": "user", "content": "Oslo?"}]
    native = aware.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + messages[1:] + chat,
        tools=[{"type": "function", "function": {"name": "get_weather",
                                                 "description": WEATHER.description,
                                                 "parameters": WEATHER.parameters}}],
        tokenize=False, add_generation_prompt=True)
    text = aware.apply_chat_template(messages + chat, tokenize=False, add_generation_prompt=True)
    assert text == native
    # and the calls it shows are what the parser reads
    assert parse(text, [WEATHER], "json").calls == [Call("get_weather", {"city": "Rome"})]
    # the compact syntax is not the template's: promptbake's documentation then
    compact = render([WEATHER], aware, "compact")
    assert compact[0]["content"].startswith("You can use tools.")


def test_a_template_that_puts_tools_outside_the_system_turn_is_not_used(tokenizer):
    outside = with_template(tokenizer, TOOLS_IN_USER_TEMPLATE)
    assert supports_tools(outside)
    messages = render([WEATHER], outside, "json")
    assert messages[0]["content"].startswith("You can use tools.")
    assert "tool_calls" not in messages[4]


def test_a_template_that_refuses_the_tool_role_gets_results_as_user_turns(tokenizer):
    strict = with_template(tokenizer, NO_TOOL_ROLE_TEMPLATE)
    assert result_role(strict) == "user"
    messages = render([WEATHER], strict)
    strict.apply_chat_template(messages, tokenize=False)  # renders: no tool role left


def test_without_a_chat_template_results_are_user_turns(tokenizer):
    plain = with_template(tokenizer, None)
    assert not supports_tools(plain) and result_role(plain) == "user"
    assert render([WEATHER], plain)[5]["content"].startswith(RESULT_MARKER)
    assert render([WEATHER], None) == render([WEATHER], plain)


def test_rendering_checks_its_arguments(tokenizer):
    with pytest.raises(ValueError, match="syntax='xml'"):
        render([WEATHER], tokenizer, "xml")
    with pytest.raises(ValueError, match="results='system'"):
        render([WEATHER], tokenizer, results="system")
    with pytest.raises(ValueError, match="duplicate tool names"):
        render([WEATHER, WEATHER], tokenizer)


def test_the_shipped_tools_render_compactly(tokenizer):
    specs = shipped.specs()
    messages = render(specs, tokenizer)
    lines = messages[0]["content"].splitlines()
    assert len(lines) == 2 + len(specs) and lines[1] == "Tools:"  # instruction, then one per tool
    assert "from_unit, to_unit: one of mm, cm" in documentation(specs)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert len(tokenizer(text)["input_ids"]) < 900

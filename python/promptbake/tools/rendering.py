"""A set of tools as the prompt u: chat messages that, put before the user's conversation, make
the model call the tools.

``render(specs, tokenizer, syntax=...)`` returns a system message (how to call, then what the
tools are) followed by the specs' examples as real chat turns: the user's message, the
assistant's call, the tool's result, the assistant's answer (examples that answer without a
tool come first, see ``demonstrations_of``). Two sources for the system text:

* for the ``json`` syntax, the tokenizer's chat template when it documents tools itself
  (``apply_chat_template(..., tools=...)``, ``supports_tools``) inside the system turn and writes
  an assistant's ``tool_calls`` in that syntax: its own text is used, and the demonstrations
  are structured ``tool_calls`` and ``tool`` messages it renders, so a model trained on tools
  sees its own format;
* otherwise promptbake's own text (``documentation``), one line per tool.

Where a tool's result goes (``results``): a ``tool`` turn when the template renders that role,
else a user turn that starts with ``RESULT_MARKER``. ``tool_turns`` builds that turn for the
demonstrations and for evaluation alike.
"""

from __future__ import annotations

import copy
import json
import logging

from jinja2 import TemplateError

from promptbake.tools.calls import COMPACT, JSON, SYNTAXES, Call, format_call, parse
from promptbake.tools.spec import Example, ToolSpec, check_set

log = logging.getLogger("promptbake")

# The default is what SmolLM2-135M-Instruct (whose template knows no tools but renders any role)
# follows. The shipped tools, first 40 held-out items (31 tool, 9 no-tool), greedy; call
# accuracy / end to end / over-calling (`python bench/tool_renderings.py`):
#   no prompt                                           0.00 / 0.23 / 0.00
#   json, documentation and examples in the system turn 0.00 / 0.19 / 0.00
#   json, demonstrations as turns                       0.03 / 0.23 / 0.44
#   compact, everything in the system turn              0.00 / 0.19 / 0.00
#   compact, demonstrations as turns (the default)      0.29 / 0.29 / 0.44  (call +0.29 ± 0.08)
#   ... with results as user turns                      0.13 / 0.16 / 0.67
# End to end it gains on the computing tools (0.08 -> 0.29, +0.21 ± 0.10, 24 items) and loses
# on country facts the model knows (0.71 -> 0.29, 7 items), where it calls CALC instead of
# LOOKUP: choosing among five tools is what a 135M model does worst.
DEFAULT_SYNTAX = COMPACT
DEMONSTRATIONS = ("turns", "system")
RESULTS = ("auto", "tool", "user")
RESULT_MARKER = "Tool result:"

# what rendering a chat template can raise: jinja's errors (raise_exception included), and
# Python's when a template meets a message it does not expect (None content, a missing key)
TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, KeyError)
_PROBE_USER = "Zq7 probe question"
_PROBE_TOOL = {"type": "function", "function": {
    "name": "zq7_probe", "description": "Xv9 probe tool",
    "parameters": {"type": "object", "properties": {"xv9": {"type": "string"}},
                   "required": ["xv9"]}}}


def render(specs: list[ToolSpec], tokenizer=None, syntax: str = DEFAULT_SYNTAX, *,
           demonstrations: str = "turns", results: str = "auto",
           instruction: str | None = None) -> list[dict]:
    """The prompt u for ``specs``: a list of chat messages (system, then demonstrations).

    ``demonstrations``: ``turns`` (each example as chat turns) or ``system`` (written out
    inside the system message). ``results``: ``tool``, ``user`` or ``auto`` (see
    ``result_role``). ``instruction``: the system message's first line (default: how to call,
    with the first example's call).
    """
    specs = check_set(list(specs))
    if syntax not in SYNTAXES or demonstrations not in DEMONSTRATIONS:
        raise ValueError(f"syntax={syntax!r}, demonstrations={demonstrations!r}: choose a syntax "
                         f"of {', '.join(SYNTAXES)} and demonstrations of "
                         f"{', '.join(DEMONSTRATIONS)}")
    role = result_role(tokenizer, results)
    examples = demonstrations_of(specs)
    instruction = instruction or _instruction(specs, syntax)
    native = syntax == JSON and _native_system(specs, tokenizer, instruction)
    if native and demonstrations == "turns" and _renders_tool_calls(tokenizer):
        messages = [{"role": "system", "content": native}]
        for example in examples:
            messages += _native_turns(example)
        return messages
    system = native or instruction + "\n" + documentation(specs, syntax)
    if demonstrations == "system":
        if examples:
            system += "\n\nExamples:\n" + "\n\n".join(_written(e, specs, syntax)
                                                       for e in examples)
        return [{"role": "system", "content": system}]
    messages = [{"role": "system", "content": system}]
    for example in examples:
        messages += example_turns(example, specs, syntax, role)
    return messages


def demonstrations_of(specs: list[ToolSpec]) -> list[Example]:
    """The specs' examples in the order they are shown: those that answer without a tool first,
    then the calls, tool by tool. A small model copies the demonstration nearest the user's
    message: on SmolLM2-135M a no-call demonstration there stopped every call."""
    examples = [e for spec in specs for e in spec.examples]
    return [e for e in examples if not e.calls] + [e for e in examples if e.calls]


def documentation(specs: list[ToolSpec], syntax: str = DEFAULT_SYNTAX) -> str:
    """promptbake's description of the tools: one line per tool, in the call syntax."""
    lines = ["Tools:"]
    for spec in specs:
        if syntax == JSON:
            lines.append(json.dumps({"name": spec.name, "description": spec.description,
                                     "parameters": spec.parameters}, ensure_ascii=False))
            continue
        properties = spec.parameters.get("properties", {})
        required = spec.parameters.get("required", [])
        names = [p if p in required else f"{p}?" for p in properties]
        described: dict[str, list[str]] = {}  # note -> the parameters it describes
        for name, sub in properties.items():
            text = sub.get("description", "")
            if "enum" in sub:
                text = (text + "; " if text else "") + "one of " + ", ".join(map(str, sub["enum"]))
            if "default" in sub:
                text += f" (default {sub['default']})"
            if text:
                described.setdefault(text, []).append(name)
        notes = [f"{', '.join(names)}: {text}" for text, names in described.items()]
        line = f"{spec.name}({', '.join(names)}) - {spec.description}"
        lines.append(line + (" " + ". ".join(notes) + "." if notes else ""))
    return "\n".join(lines)


def example_turns(example: Example, specs: list[ToolSpec], syntax: str, role: str) -> list[dict]:
    """An example as chat turns: user, assistant call(s), result(s), assistant answer."""
    turns = [{"role": "user", "content": example.user}]
    if example.calls:
        turns.append({"role": "assistant", "content": call_text(example.calls, specs, syntax)})
        turns += tool_turns(example.results, role)
    turns.append({"role": "assistant", "content": example.answer})
    return turns


def call_text(calls: list[Call], specs: list[ToolSpec], syntax: str) -> str:
    """An assistant turn that makes ``calls``, one per line."""
    schemas = {s.name: s.parameters for s in specs}
    return "\n".join(format_call(c, syntax, schemas.get(c.name)) for c in calls)


def tool_turns(results: list[str], role: str) -> list[dict]:
    """The turn(s) that give results back: one ``tool`` message per result, or one user message
    with a ``RESULT_MARKER`` line per result (user and assistant then still alternate)."""
    if role == "tool":
        return [{"role": "tool", "content": r} for r in results]
    if role != "user":
        raise ValueError(f"role={role!r}: results go back as 'tool' or 'user' turns")
    return [{"role": "user", "content": "\n".join(f"{RESULT_MARKER} {r}" for r in results)}]


def result_role(tokenizer, results: str = "auto") -> str:
    """``tool`` or ``user``: where results go. ``auto`` is ``tool`` when the tokenizer's chat
    template renders a tool message's content, else ``user``."""
    if results not in RESULTS:
        raise ValueError(f"results={results!r}: choose one of {', '.join(RESULTS)}")
    if results != "auto":
        return results
    if not getattr(tokenizer, "chat_template", None):
        return "user"
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "tool", "content": _PROBE_USER}]
    try:
        return "tool" if _PROBE_USER in _apply(tokenizer, probe) else "user"
    except TEMPLATE_ERRORS:  # a template that refuses the role raises (jinja's raise_exception)
        return "user"


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes tool definitions into the prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    user = [{"role": "user", "content": _PROBE_USER}]
    try:
        with_tools = _apply(tokenizer, user, tools=[_PROBE_TOOL])
    except TEMPLATE_ERRORS:
        return False
    return "zq7_probe" in with_tools and with_tools != _apply(tokenizer, user)


def tool_schema(spec: ToolSpec) -> dict:
    """``spec`` in the form chat templates and OpenAI-style APIs take (``tools=[...]``)."""
    return {"type": "function", "function": {"name": spec.name, "description": spec.description,
                                             "parameters": spec.parameters}}


def _instruction(specs: list[ToolSpec], syntax: str) -> str:
    # No tool is named here: an instruction that showed the first tool's call ("for example
    # CALC(17 * 23)") drew SmolLM2-135M to that tool for every kind of question.
    form = "NAME(arguments)" if syntax == COMPACT else \
        '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>'
    shown = " as in the examples" if any(e.calls for s in specs for e in s.examples) else ""
    return (f"You can use tools. To use one, reply with only the call, written {form}{shown}; "
            f"you then get its result and give the answer. If no tool is needed, just answer.")


def _written(example: Example, specs: list[ToolSpec], syntax: str) -> str:
    lines = [f"User: {example.user}"]
    if example.calls:
        lines.append(f"Assistant: {call_text(example.calls, specs, syntax)}")
        lines += [f"{RESULT_MARKER} {r}" for r in example.results]
    lines.append(f"Assistant: {example.answer}")
    return "\n".join(lines)


def _apply(tokenizer, messages, **options) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **options)


def _native_system(specs: list[ToolSpec], tokenizer, instruction: str) -> str | None:
    """The system text the template writes for ``specs`` after ``instruction``, if it writes the
    tools inside the system turn (checked by rendering that text without ``tools``), else None."""
    if tokenizer is None or not supports_tools(tokenizer):
        return None
    user = [{"role": "user", "content": _PROBE_USER}]
    system = [{"role": "system", "content": instruction}]
    try:
        with_tools = _apply(tokenizer, system + user, tools=[tool_schema(s) for s in specs])
        plain = _apply(tokenizer, system + user)
    except TEMPLATE_ERRORS as err:
        log.info("promptbake: the chat template cannot render tools with a system message (%s); "
                 "using promptbake's own tool documentation", err)
        return None
    at = plain.find(instruction)
    before, rest = plain[:at], plain[at + len(instruction):]
    if at < 0 or not with_tools.startswith(before) or not with_tools.endswith(rest):
        return None
    candidate = with_tools[len(before):len(with_tools) - len(rest)]
    if _apply(tokenizer, [{"role": "system", "content": candidate}] + user) != with_tools:
        log.info("promptbake: the chat template writes tools outside the system turn; using "
                 "promptbake's own tool documentation")
        return None
    return candidate


def _native_turns(example: Example) -> list[dict]:
    turns = [{"role": "user", "content": example.user}]
    if example.calls:
        turns.append({"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": c.name, "arguments": copy.deepcopy(
                c.arguments)}} for c in example.calls]})
        turns += [{"role": "tool", "name": c.name, "content": r}
                  for c, r in zip(example.calls, example.results)]
    turns.append({"role": "assistant", "content": example.answer})
    return turns


def _renders_tool_calls(tokenizer) -> bool:
    """Whether the template writes an assistant's ``tool_calls`` in the ``json`` syntax, so
    that what the model learns from the demonstrations is what the parser reads."""
    call = Call("zq7_probe", {"xv9": "a"})
    messages = [{"role": "user", "content": _PROBE_USER}] + _native_turns(
        Example("unused", [call], ["b"], "c"))[1:2]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TEMPLATE_ERRORS:
        return False
    probe = ToolSpec("zq7_probe", "probe", _PROBE_TOOL["function"]["parameters"])
    return parse(text, [probe], JSON).calls == [call]

"""How teacher and student inputs are framed with the tokenizer's chat template.

Eq. 3 compares P_theta(. | u, x, y_<t) with P_theta_u(. | x, y_<t): both sides see the same context
x and response y; only the system prompt u differs. Teacher = template(system: u, x) + y;
student = template(x) + y, where "template(x)" is one of three explicit choices:

* ``default`` (the default): no system message, exactly what the model sees when it is deployed
  without a system prompt, including the template's own default system turn if it has one
  (SmolLM2's inserts "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
  The baked behaviour then appears where the baked model will be used.
* ``empty``: an explicit empty system message.
* ``none``: no system turn at all; a template's default system turn is removed.

The prompt u is a system text, or a conversation: a list of chat messages (a system message and
demonstration turns, e.g. user -> assistant call -> tool result -> assistant answer) that the
teacher reads before x and the student never sees. Either way the whole prefix is on the teacher's
side only, and ``check`` verifies that the template rendered every part of it exactly there.

Tokenizers without a chat template fall back to plain text (teacher: u, a blank line, x; student:
x), with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from promptbake.contexts import Context, as_context

log = logging.getLogger("promptbake")

STUDENT_FRAMINGS = ("default", "empty", "none")
PROMPT_ROLES = ("system", "user", "assistant", "tool")
_PROBE_USER = "Zq7 probe question"
_PROBE_SYSTEM = "Xv9 probe instructions"


class FramingError(ValueError):
    """Teacher and student inputs cannot be framed consistently; the message says why."""


def prompt_messages(prompt, *, order: bool = True) -> list[dict]:
    """The prompt u as the chat messages the teacher reads before a context: a system text is one
    system message; a conversation (a list of ``{"role", "content"}``) is checked and copied.
    ``order``: also refuse a conversation whose turns no chat would hold (``_check_order``), as
    the entry points do (bake, pursuit, the engine, ``--prompt-file``); ``Framing`` does not,
    so that bakes made before that rule still load."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise FramingError("prompt is empty: pass the text to bake with --prompt or "
                               "--prompt-file")
        return [{"role": "system", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise FramingError("the prompt is an empty list of chat messages: give at least a "
                           "system message, {\"role\": \"system\", \"content\": text}")
    if not isinstance(prompt, (list, tuple)):
        raise FramingError(f"a prompt is a text or a non-empty list of chat messages, not "
                           f"{type(prompt).__name__}")
    out = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in PROMPT_ROLES or \
                not isinstance(message.get("content"), str):
            raise FramingError(f"prompt message {i} must be {{\"role\": one of "
                               f"{', '.join(PROMPT_ROLES)}, \"content\": text}}, got {message!r}")
        out.append(dict(message))
    if not any(m["content"].strip() for m in out):
        raise FramingError("every message of the prompt is empty: give the prompt some text")
    if order:
        _check_order([m["role"] for m in out])
    return out


def _check_order(roles: list[str]) -> None:
    """Refuses a conversation prompt whose turns no chat would hold, each context coming after
    it: a system message after another turn, a tool result after no assistant call or followed
    by no assistant answer, two user or two assistant turns in a row, or a last turn that is not
    the assistant's (or a system message) -- templates render these without a word, or refuse
    them later. Every demonstration (a user turn and what follows it) then ends with the
    assistant, so the engine's reordered or dropped demonstrations stay in order."""
    for i, (before, role) in enumerate(zip([None, *roles], roles)):
        if role == "system" and before not in (None, "system"):
            raise FramingError(f"prompt message {i} is a system message after message {i - 1} "
                               f"({before}): put the system text first")
        if role == "tool" and before not in ("assistant", "tool"):
            raise FramingError(f"prompt message {i} is a tool result that follows no assistant "
                               f"turn: put the assistant's call before it")
        if before == "tool" and role not in ("assistant", "tool"):
            raise FramingError(f"prompt message {i} is a {role} turn right after a tool result: "
                               f"put the assistant's answer to the result between them")
        if role == before and role in ("user", "assistant"):
            raise FramingError(f"prompt messages {i - 1} and {i} are both {role} turns: join "
                               f"them into one message")
    if roles[-1] not in ("system", "assistant"):
        raise FramingError(f"the prompt ends with a {roles[-1]} message, so each context's user "
                           f"turn would follow it unanswered: end the demonstrations with the "
                           f"assistant's reply, or put an instruction in the system message")


def read_prompt_file(path) -> str | list:
    """A prompt from a UTF-8 file: its text, or, for a ``.json`` file, a conversation (a JSON
    list of chat messages, checked by ``prompt_messages``)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise ValueError(f"prompt file not found: {path}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: save it as UTF-8") from err
    if path.suffix.lower() != ".json":
        return text.strip()
    try:
        messages = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): a .json prompt file holds a list "
                         f"of chat messages") from err
    prompt_messages(messages)  # names the message that is not one
    return messages


def prompt_text(prompt) -> str:
    """The prompt as one text, for manifests, hashes and labels: a system text as it is, a
    conversation as canonical JSON."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt_messages(prompt), ensure_ascii=False, sort_keys=True)


@dataclasses.dataclass
class Framing:
    """Builds token ids for the teacher (with the prompt) and the student (without it)."""

    tokenizer: object
    prompt: str | list  # a system text, or a conversation (see prompt_messages)
    student: str = "default"
    messages: list = dataclasses.field(init=False, default=None, repr=False)  # the teacher's prefix
    default_system: str | None = dataclasses.field(init=False, default=None)
    templated: bool = dataclasses.field(init=False, default=True)

    def __post_init__(self):
        self.messages = prompt_messages(self.prompt, order=False)
        if self.student not in STUDENT_FRAMINGS:
            raise FramingError(f"unknown student framing {self.student!r}: choose one of "
                               f"{', '.join(STUDENT_FRAMINGS)}")
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        if not self.templated:
            log.warning("promptbake: the tokenizer has no chat template; framing as plain text "
                        "(teacher: prompt, blank line, context; student: context)")
            return
        self.default_system = self._detect_default_system()

    # -- rendering ---------------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja errors: e.g. a template that rejects system messages
            roles = [m["role"] for m in messages]
            raise FramingError(f"the chat template cannot render the roles {roles}: {err}") from err

    def _detect_default_system(self) -> str | None:
        """The system text the template inserts when no system message is given, if any."""
        user = [{"role": "user", "content": _PROBE_USER}]
        with_system = self._render([{"role": "system", "content": _PROBE_SYSTEM}] + user)
        without = self._render(user)
        at = with_system.find(_PROBE_SYSTEM)
        if at < 0:
            raise FramingError("the chat template ignores system messages, so the prompt cannot "
                               "be given to the teacher")
        before = with_system[:at]
        after = with_system[at + len(_PROBE_SYSTEM):with_system.index(_PROBE_USER)]
        if not without.startswith(before) or after not in without[len(before):]:
            return None
        candidate = without[len(before):without.index(after, len(before))]
        if candidate and self._render([{"role": "system", "content": candidate}] + user) == without:
            return candidate
        return None

    def teacher_messages(self, context: Context | str) -> list[dict]:
        return [dict(m) for m in self.messages] + as_context(context)

    def student_messages(self, context: Context | str) -> list[dict]:
        if self.student == "empty":
            return [{"role": "system", "content": ""}] + as_context(context)
        return as_context(context)

    def teacher_text(self, context: Context, generation_prompt: bool = True) -> str:
        if not self.templated:
            return "\n".join(m["content"] for m in self.messages) + "\n\n" + _plain(context)
        return self._render(self.teacher_messages(context), generation_prompt)

    def student_text(self, context: Context, generation_prompt: bool = True) -> str:
        if not self.templated:
            return _plain(context)
        messages = self.student_messages(context)
        if not messages:  # unconditional: templates refuse an empty conversation
            if self.student == "default" and self.default_system is not None:
                messages = [{"role": "system", "content": self.default_system}]
            else:
                return self._assistant_header() if generation_prompt else ""
        text = self._render(messages, generation_prompt)
        if self.student == "none" and self.default_system is not None:
            text = self._without_default_system(text)
        return text

    def _assistant_header(self) -> str:
        probe = [{"role": "system", "content": _PROBE_SYSTEM}]
        opened, closed = self._render(probe), self._render(probe, generation_prompt=False)
        return opened[len(closed):]

    def _without_default_system(self, text: str) -> str:
        turn = self._render([{"role": "system", "content": self.default_system}],
                            generation_prompt=False)
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        candidates = [turn]
        if bos and turn.startswith(bos):
            candidates.append(turn[len(bos):])  # keep a real BOS that opens the whole text
        for candidate in candidates:
            if candidate in text:
                stripped = text.replace(candidate, "", 1)
                if not bos or not text.startswith(bos) or stripped.startswith(bos):
                    return stripped
        raise FramingError("framing 'none' cannot remove this template's default system turn; "
                           "use --framing default or --framing empty")

    def _encode(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; plain text gets the tokenizer's usual ones.
        return list(self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"])

    def teacher_ids(self, context: Context) -> list[int]:
        return self._encode(self.teacher_text(context))

    def student_ids(self, context: Context) -> list[int]:
        return self._encode(self.student_text(context))

    # -- verification ------------------------------------------------------------------------

    def check(self, context: Context) -> None:
        """Refuses a context whose teacher and student inputs would not be comparable."""
        teacher, student = self.teacher_text(context), self.student_text(context)
        for part in {m["content"].strip() for m in self.messages if m["content"].strip()}:
            if teacher.count(part) < student.count(part) + 1:
                raise FramingError(f"the teacher input does not contain the prompt's part "
                                   f"{part[:60]!r} once more than the student input: the chat "
                                   f"template dropped it")
        if not self.templated:
            return
        # Both sides must end with the same generation prompt (the assistant turn's header), so
        # the response y continues the same kind of turn on both sides.
        heads = []
        for text, closed in ((teacher, self.teacher_text(context, generation_prompt=False)),
                             (student, self.student_text(context, generation_prompt=False))):
            heads.append(text[len(closed):] if text.startswith(closed) else None)
        if heads[0] is None or heads[0] != heads[1]:
            raise FramingError(f"teacher and student end with different assistant headers "
                               f"({heads[0]!r} vs {heads[1]!r}): the responses would not align")
        head_ids = self._encode(heads[0]) if heads[0] else []
        t_ids, s_ids = self._encode(teacher), self._encode(student)
        if head_ids and (t_ids[-len(head_ids):] != head_ids or s_ids[-len(head_ids):] != head_ids):
            raise FramingError("the assistant header tokenizes differently on the teacher and "
                               "student side; the response tokens would not align")


def _plain(context: Context | str) -> str:
    return "".join(m["content"] + "\n" for m in as_context(context))


def align(teacher_prefix: list[int], student_prefix: list[int], response: list[int]):
    """Teacher and student token sequences for one trajectory, and where the response sits.

    Returns (teacher_ids, student_ids, teacher_start, student_start): the response occupies
    ``ids[start:]`` on each side, and the logits predicting it are ``logits[start - 1:-1]``.
    """
    teacher = list(teacher_prefix) + list(response)
    student = list(student_prefix) + list(response)
    t0, s0 = len(teacher_prefix), len(student_prefix)
    if not response or teacher[t0:] != student[s0:] or len(teacher) - t0 != len(student) - s0:
        raise FramingError("teacher and student response tokens differ; refusing to train on "
                           "misaligned positions")
    if t0 == 0 or s0 == 0:
        raise FramingError("a response needs at least one prefix token to be predicted from")
    return teacher, student, t0, s0

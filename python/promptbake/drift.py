"""Persona drift: how well a model keeps a persona over a long conversation.

The model answers a user for ``turns`` turns, the whole history staying in its chat-templated
context as in real use; after every turn its answer is scored for persona adherence (rule,
semantic and their combination, see ``promptbake.persona``). Any prompt has a persona: a persona
file, the built-in one whose prompt was baked, or one derived from the prompt itself (answers with
and without it as exemplars, ``persona.from_prompt``), whose adherence is its semantic score.

Drift = mean adherence over the first k turns minus adherence at turn N (and minus the mean of the
last k turns), per conversation, then averaged; standard errors treat each conversation as the
independent unit. Conversations of one call differ by their user turns (a seeded ordering of the
scripted list) and, when sampling, by the sampled answers; two calls with the same ``seed`` see the
same user turns, so their drifts compare pairwise (``drift_difference``). The same seed means the
same user turns, not the same samples: one generator draws for every row at each step, so a
conversation's sampled answers depend on the others in the call.

All conversations of a call are decoded together (``decoding.Conversations``), and each one's KV
cache is kept from turn to turn: a turn feeds only what is new in the context (the end of the last
answer, the user's message, the assistant header). Rows of different lengths share one cache with
masked-out columns ("holes"), and each row's position ids count only its real tokens, so every
token sees exactly the context it would see alone. The cache lives in buffers with room for the
turn, so decoding writes each step in place rather than copying the whole cache (a copy per step
and layer otherwise dominates once the history is long). Where the re-rendered history differs from
the tokens already in the cache (an answer that re-tokenizes differently), the cache is kept up to
the first difference and the rest masked out, so the model always reads the canonical chat-
templated history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from promptbake import mc_kl, modeling, plotting
from promptbake.decoding import Conversations, response_text, stop_token_ids
from promptbake.framing import STUDENT_FRAMINGS, Framing
from promptbake.persona import SCORERS, Persona, SemanticScorer, persona_of, score

log = logging.getLogger("promptbake")

USER_MODES = ("scripted", "self")


# The assistant-facing instruction for the user side in self-play (``user="self"``).
SELF_PLAY_PROMPT = ("You are a person chatting with an AI assistant. Write your next message "
                    "to the assistant: one short question or reply, in the first person, at most "
                    "two sentences. Write only the message.")
_SELF_PLAY_KICKOFF = "Start the conversation."


# -- user turns --------------------------------------------------------------------------------

def user_turns() -> dict[str, list[str]]:
    """The shipped scripted user turns by section (openers, follow-ups, topic changes, pulls)."""
    text = resources.files("promptbake").joinpath("data/drift_user_turns.txt").read_text("utf-8")
    return _parse_turns(text)



def _parse_turns(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = "openers"
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("## "):
            current = line[3:].strip()
        elif line and not line.startswith("#"):
            sections.setdefault(current, []).append(line)
    return sections



def scripted_conversation(turns: int, seed: int, sections: dict[str, list[str]] | None = None
                          ) -> list[str]:
    """``turns`` user messages: an opener, then the other lines in a seeded order (reshuffled
    when the list runs out); a follow-up is never first."""
    sections = sections or user_turns()
    openers = sections.get("openers") or [t for s in sections.values() for t in s]
    rng = random.Random(f"drift:{seed}")
    first = rng.choice(openers)
    rest = [t for s in sections.values() for t in s if t != first] or [first]
    out = [first]
    while len(out) < turns:
        rng.shuffle(rest)
        out += rest[:turns - len(out)]
    return out



# -- the drift measurement ---------------------------------------------------------------------

@dataclasses.dataclass
class DriftResult:
    """Per-turn adherence of several conversations, their transcripts and the drift.

    ``scores[scorer][c][t]``: scorer's value for conversation c's answer at turn t + 1.
    ``transcripts[c]``: ``[{"user": ..., "answer": ...}, ...]`` per turn.
    """

    persona: str
    system: str | None
    scores: dict[str, list[list[float]]]
    transcripts: list[list[dict]]
    settings: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def turns(self) -> int:
        return len(self.transcripts[0])

    @property
    def conversations(self) -> int:
        return len(self.transcripts)

    def _values(self, scorer: str) -> np.ndarray:
        if scorer not in self.scores:
            raise ValueError(f"unknown scorer {scorer!r}: choose one of {', '.join(self.scores)}")
        return np.asarray(self.scores[scorer], dtype=np.float64)

    def curve(self, scorer: str = "adherence") -> tuple[list[float], list[float | None]]:
        """Per-turn mean over conversations and its standard error (None for one conversation)."""
        values = self._values(scorer)
        return values.mean(0).tolist(), [_se(values[:, t]) for t in range(values.shape[1])]

    def drift(self, scorer: str = "adherence", k: int = 3, at: int | None = None) -> dict:
        """Mean over the first ``k`` turns minus the value at turn ``at`` (default the last) and
        minus the mean of the last ``k`` turns, per conversation; means and standard errors."""
        per = self._per_conversation(scorer, k, at)
        return {"scorer": scorer, "k": k, "at": per["at"],
                "first": float(per["first"].mean()), "first_se": _se(per["first"]),
                "at_value": float(per["at_value"].mean()), "at_value_se": _se(per["at_value"]),
                "last": float(per["last"].mean()), "last_se": _se(per["last"]),
                "drift": float(per["drift"].mean()), "drift_se": _se(per["drift"]),
                "drift_last": float(per["drift_last"].mean()),
                "drift_last_se": _se(per["drift_last"])}

    def _per_conversation(self, scorer: str, k: int, at: int | None) -> dict:
        values = self._values(scorer)
        n = values.shape[1]
        at = n if at is None else at
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must be between 1 and the number of turns ({n})")
        if not 1 <= at <= n:
            raise ValueError(f"at={at} must be a turn between 1 and {n}")
        first, last = values[:, :k].mean(1), values[:, n - k:].mean(1)
        return {"at": at, "first": first, "last": last, "at_value": values[:, at - 1],
                "drift": first - values[:, at - 1], "drift_last": first - last}

    def to_dict(self, k: int = 3) -> dict:
        curves = {}
        for scorer in self.scores:
            mean, se = self.curve(scorer)
            curves[scorer] = {"mean": mean, "se": se}
        return {"persona": self.persona, "system": self.system, "turns": self.turns,
                "conversations": self.conversations, "settings": self.settings,
                "stats": self.stats, "curves": curves,
                "drift": {s: self.drift(s, k=min(k, self.turns)) for s in self.scores},
                "scores": self.scores, "transcripts": self.transcripts}

    @classmethod
    def from_dict(cls, data: dict) -> DriftResult:
        return cls(data["persona"], data["system"], data["scores"], data["transcripts"],
                   data.get("settings", {}), data.get("stats", {}))



def _se(values: np.ndarray) -> float | None:
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))



def drift_difference(a: DriftResult, b: DriftResult, scorer: str = "adherence", k: int = 3,
                     at: int | None = None) -> dict:
    """Drift of ``a`` minus drift of ``b`` (negative: ``a`` drifts less), paired by conversation
    when both saw the same user turns (the same ``seed`` and scripted user), else independent."""
    if at is None and a.turns != b.turns:
        raise ValueError(f"the results have {a.turns} and {b.turns} turns: pass at= (a turn both "
                         f"reached) to compare their drift at the same turn")
    pa, pb = a._per_conversation(scorer, k, at), b._per_conversation(scorer, k, at)
    users = [[t["user"] for t in c] for c in a.transcripts]
    paired = a.settings.get("user") == "scripted" and \
        users == [[t["user"] for t in c] for c in b.transcripts]
    out = {"scorer": scorer, "k": k, "at": pa["at"], "paired": paired}
    for key in ("drift", "drift_last"):
        diff = float(pa[key].mean() - pb[key].mean())
        if paired:
            se = _se(pa[key] - pb[key])
        else:
            sa, sb = _se(pa[key]), _se(pb[key])
            se = None if sa is None or sb is None else math.sqrt(sa * sa + sb * sb)
        out[key], out[f"{key}_se"] = diff, se
    return out



@torch.no_grad()
def drift(model, tokenizer, persona: Persona, *, system: str | None = None,
          framing: str = "default", turns: int = 30, user: str = "scripted",
          conversations: int = 8, max_new_tokens: int = 48, temperature: float = 0.7,
          top_p: float = 1.0, seed: int = 0, reuse_cache: bool = True,
          user_turns_list: Sequence[str] | None = None, user_max_new_tokens: int = 40,
          user_side: Callable[[], contextlib.AbstractContextManager] | None = None,
          semantic: SemanticScorer | None = None,
          progress: Callable[[int, dict], None] | None = None) -> DriftResult:
    """Persona adherence of ``model`` over ``turns`` turns of ``conversations`` conversations.

    ``system``: the system prompt on the persona side (the persona's prompt for a prompted model,
    None for a baked or base model); with None, ``framing`` says how the context starts, as in
    the bake (``default``: the template's own default system turn; ``empty``; ``none``).
    ``user``: ``scripted`` (the shipped turns, or ``user_turns_list``, in a seeded order per
    conversation: seed ``seed + c``) or ``self``: the first user turn is scripted, then the same
    model writes each next user message from a context of its own: system ``SELF_PLAY_PROMPT``,
    a user message "Start the conversation.", then the conversation with roles swapped (its own
    earlier messages as assistant turns, the persona's answers as user turns), decoding at most
    ``user_max_new_tokens``; the first non-empty line, without quotes or a "User:" label, is the
    message (a scripted follow-up when it is empty). ``user_side``: a context manager factory
    entered while the user side generates, e.g. ``lambda: promptbake.modeling.BASE.active(model)``
    so that a baked model's user is the base model; by default it is the same
    model as it is. ``temperature`` 0 is greedy; otherwise sampling (top-p) from one generator
    seeded with ``seed``. ``semantic``: a prebuilt scorer (default: MiniLM on ``persona``).
    ``progress(turn, mean scores)`` is called after every turn.
    """
    if not isinstance(turns, int) or turns < 1:
        raise ValueError(f"turns={turns!r} must be an integer >= 1")
    if not isinstance(conversations, int) or conversations < 1:
        raise ValueError(f"conversations={conversations!r} must be an integer >= 1")
    if max_new_tokens < 1 or user_max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and user_max_new_tokens="
                         f"{user_max_new_tokens} must be >= 1")
    if user not in USER_MODES:
        raise ValueError(f"user={user!r}: choose one of {', '.join(USER_MODES)}")
    if framing not in STUDENT_FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}: choose one of "
                         f"{', '.join(STUDENT_FRAMINGS)}")
    if not (temperature >= 0 and math.isfinite(temperature)) or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if isinstance(system, str) and not system.strip():
        raise ValueError("system is an empty string: pass None for no system prompt (and choose "
                         "the framing), or the persona's prompt")
    if not isinstance(persona, Persona):
        raise ValueError(f"persona must be a promptbake.persona.Persona, not "
                         f"{type(persona).__name__}: build one or use Persona.load(path)")
    semantic = semantic or SemanticScorer(persona)

    if user_turns_list is not None:
        lines = [t.strip() for t in user_turns_list if t and t.strip()]
        if not lines:
            raise ValueError("user_turns_list is empty: give at least one user message")
        sections = {"openers": lines}
    else:
        sections = user_turns()
    # Conversation c of seed s: script seed 1000 s + c, so calls with different seeds share no
    # conversation (unless one has over 1000) and seed 0 keeps scripts 0, 1, 2, ...
    scripts = [scripted_conversation(turns, 1000 * seed + c, sections)
               for c in range(conversations)]
    follow_ups = sections.get("follow-ups") or ["Can you say more about that?"]

    # Framing's prompt is the persona side's system prompt; without one it only names the
    # framing of the student side (the prompt text is then never rendered).
    side = Framing(tokenizer, system or persona.prompt, framing)
    render = side.teacher_ids if system is not None else side.student_ids
    user_framing = Framing(tokenizer, SELF_PLAY_PROMPT, framing)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer, model)
    if not stops:
        raise ValueError("the tokenizer and model define no end-of-sequence token, so an answer "
                         "cannot end: set tokenizer.eos_token")
    generator = torch.Generator().manual_seed(seed)
    answerer = Conversations(model, conversations, pad_id, stops, reuse_cache)
    asker = Conversations(model, conversations, pad_id, stops, reuse_cache) \
        if user == "self" else None
    histories: list[list[dict]] = [[] for _ in range(conversations)]
    transcripts: list[list[dict]] = [[] for _ in range(conversations)]
    scores: dict[str, list[list[float]]] = {s: [[] for _ in range(conversations)] for s in SCORERS}
    clock = {"answer": 0.0, "user": 0.0, "score": 0.0}
    fallbacks = 0
    start = time.perf_counter()
    for turn in range(turns):
        if user == "scripted" or turn == 0:
            asks = [script[turn] for script in scripts]
        else:
            tick = time.perf_counter()
            asks = _self_play_turns(asker, user_framing, histories, user_max_new_tokens,
                                    temperature, top_p, generator, tokenizer, user_side)
            clock["user"] += time.perf_counter() - tick
            for c, ask in enumerate(asks):
                if not ask:
                    asks[c] = follow_ups[(seed + c + turn) % len(follow_ups)]
                    fallbacks += 1
        for history, ask in zip(histories, asks):
            history.append({"role": "user", "content": ask})
        tick = time.perf_counter()
        responses = answerer.respond([render(h) for h in histories], max_new_tokens,
                                     temperature, top_p, generator)
        clock["answer"] += time.perf_counter() - tick
        answers = [response_text(tokenizer, r, stops) for r in responses]
        tick = time.perf_counter()
        turn_scores = score(persona, answers, semantic)
        clock["score"] += time.perf_counter() - tick
        for c, (history, ask, answer) in enumerate(zip(histories, asks, answers)):
            history.append({"role": "assistant", "content": answer})
            transcripts[c].append({"user": ask, "answer": answer})
            for s in SCORERS:
                scores[s][c].append(turn_scores[s][c])
        if progress:
            progress(turn + 1, {s: float(np.mean(turn_scores[s])) for s in SCORERS})
        log.debug("promptbake: drift turn %d/%d, adherence %.3f", turn + 1, turns,
                  float(np.mean(turn_scores["adherence"])))
    stats = {"seconds": time.perf_counter() - start,
             **{f"{k}_seconds": v for k, v in clock.items()},
             "answerer": answerer.stats, "self_play_fallbacks": fallbacks}
    if asker is not None:
        stats["asker"] = asker.stats
    settings = {"framing": framing, "turns": turns, "user": user, "conversations": conversations,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "reuse_cache": reuse_cache,
                "user_max_new_tokens": user_max_new_tokens if user == "self" else None,
                "semantic_levels": {"persona": semantic.persona_level,
                                    "neutral": semantic.neutral_level},
                "rule_weight": persona.rule_weight, "scorer": persona.describe()}
    return DriftResult(persona.name, system, scores, transcripts, settings, stats)



def _self_play_turns(asker: Conversations, framing: Framing, histories: list[list[dict]],
                     max_new_tokens: int, temperature: float, top_p: float,
                     generator: torch.Generator, tokenizer, user_side) -> list[str]:
    """The user side's next message for each conversation (roles swapped; see ``drift``)."""
    contexts = []
    for history in histories:
        swapped = [{"role": "user", "content": _SELF_PLAY_KICKOFF}]
        swapped += [{"role": "assistant" if m["role"] == "user" else "user",
                     "content": m["content"]} for m in history]
        contexts.append(framing.teacher_ids(swapped))
    with (user_side() if user_side else contextlib.nullcontext()):
        responses = asker.respond(contexts, max_new_tokens, temperature, top_p, generator)
    return [_clean_user_message(response_text(tokenizer, r, asker.stop_ids)) for r in responses]



def _clean_user_message(text: str) -> str:
    for line in text.splitlines():
        line = re.sub(r"^\s*(user|me|person)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
        line = line.strip().strip('"“”').strip()
        if line:
            return line
    return ""



MODES = ("prompted", "baked", "base")



def check_modes(modes: Sequence[str]) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes={list(modes)!r}: choose one or more of {', '.join(MODES)}")



def check_self_play(teacher, user) -> None:
    """A self-play user must be one model in every mode: refused beside a separate teacher
    (``mc_kl.teacher_of``), whose prompted conversations could not share it."""
    if teacher is not None and user == "self":
        raise ValueError("this bake learned from a separate teacher model, whose prompted "
                         "conversations cannot share a self-play user with the baked model: "
                         "use scripted user turns (promptbake drift: use --user scripted)")


def drift_modes(baked, persona: Persona | None = None, modes: Sequence[str] = MODES,
                teacher: tuple | None = None, **options) -> dict[str, DriftResult]:
    """``drift`` of a ``promptbake.Baked`` model as each variant in ``modes`` (names of
    ``promptbake.modeling.VARIANTS``): ``prompted`` (base model with the baked prompt as system
    prompt), ``baked`` (adapter on at the bake's strength, no prompt), ``base`` (adapter off, no
    prompt), with the bake's framing and the same seed, so the modes see the same scripted user
    turns and compare pairwise (``drift_difference``).

    ``persona``: default the built-in one whose prompt is the baked prompt, else one derived from
    the prompt (``persona.persona_of``). In self-play the user side is the base model (adapter
    off) in every mode, so every mode talks to the same user. ``teacher``: for a bake that learned
    another model's prompted behaviour (``mc_kl.teacher_of``), the prompted mode is that model
    with u (scripted users only: a self-play user must be one model in every mode). ``options``:
    the other arguments of ``drift``.
    """
    check_modes(modes)
    if "prompted" in modes:
        mc_kl.check_own_teacher(baked, teacher)
        check_self_play(teacher, options.get("user"))
    persona = persona or persona_of(baked, max_new_tokens=options.get("max_new_tokens", 48),
                                    teacher=teacher)
    options.setdefault("framing", baked.framing.student)
    if options.get("semantic") is None:
        options["semantic"] = SemanticScorer(persona)
    options.setdefault("user_side", lambda: modeling.BASE.active(baked.model))
    results = {}
    for mode in modes:
        variant = modeling.variant(mode, baked.strength)
        system = baked.prompt if variant.prompted else None
        if teacher is not None and mode == "prompted":
            results[mode] = drift(teacher[0], baked.tokenizer, persona, system=system, **options)
        else:
            with variant.active(baked.model):
                results[mode] = drift(baked.model, baked.tokenizer, persona, system=system,
                                      **options)
        summary = results[mode].drift(k=min(3, results[mode].turns))
        se = summary["drift_se"]  # None from one conversation
        log.info("promptbake: drift of the %s model: %.3f%s", mode, summary["drift"],
                 "" if se is None else f" ± {se:.3f}")
    return results


# -- plots -------------------------------------------------------------------------------------

def plot_drift(results: dict[str, DriftResult], path: str | Path,
               scorers: Sequence[str] = ("rule", "semantic", "adherence")) -> Path:
    """One panel per scorer: each result's per-turn mean with a ±1 standard-error band, written
    atomically as a PNG to ``path``."""
    if not results:
        raise ValueError("no drift results to plot: pass {label: DriftResult}")
    with plotting.figure(path, ncols=len(scorers), figsize=(4.5 * len(scorers), 3.6)) as (fig,
                                                                                        axes):
        for ax, scorer in zip(axes[0], scorers):
            for label, result in results.items():
                mean, se = result.curve(scorer)
                x = np.arange(1, len(mean) + 1)
                m = np.asarray(mean)
                line, = ax.plot(x, m, marker=".", label=f"{label} (n={result.conversations})")
                if any(s is not None for s in se):
                    s = np.asarray([0.0 if v is None else v for v in se])
                    ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2)
            ax.set_title(scorer)
            ax.set_xlabel("turn")
            if scorer != "semantic_raw":
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("persona adherence")
        axes[0][-1].legend(fontsize=8)
        persona = next(iter(results.values())).persona
        fig.suptitle(f"persona drift: {persona} (mean ± 1 s.e. over conversations)")
    return Path(path)

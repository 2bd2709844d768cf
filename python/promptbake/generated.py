"""Contexts the model writes: user messages from the prompt's own domain and of general kinds.

A bake learns the prompted model only on the kinds of input it sees, and a user baking a SQL
assistant or a support bot needs contexts like their traffic. Here a model (the one being baked,
or a generator the user names) writes them, as small instruct models do best: a numbered list of
five messages per request.

* **domain**: the generator reads the prompt u and lists messages that users of an assistant
  with those instructions would send (and, as the kind ``against``, messages asking it to break
  them).
* **general**: a taxonomy of kinds (``GENERAL``: open questions, how-to, short facts, arithmetic
  and word problems, multiple choice, classification, format-constrained instructions, code,
  chit-chat), each asked about a topic drawn from ``TOPICS``; and ``follow-up``: the generator
  answers an accepted message without the prompt and lists what the user would say next, giving
  a three-turn context.

Every candidate is filtered (``REASONS``: too short or too long, not English, not a user message,
leaks the prompt, a near duplicate of another candidate, or of an evaluation item, a scripted
drift turn, an off-distribution probe or a shipped held-out context), and what was dropped is
counted and kept with examples. Results are cached under ``models.cache_root()/contexts`` by the
generator's weights, the prompt and the settings, so a second bake generates nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import random
import re
import time
from pathlib import Path

import torch

from promptbake import contexts as contexts_mod, drift, files, models
from promptbake.contexts import Context
from promptbake.decoding import greedy, stop_token_ids
from promptbake.framing import Framing, prompt_messages
from promptbake.tasks import TASKS, load_task
from promptbake.trajectories import SamplingConfig, sample

RECIPE = 3  # bump when the requests or filters change: cached generations are then remade
# Every answer is begun with the list's first number, so that a small model writes the list at
# once rather than a preamble or prose that holds no list, and a row stops once five items are
# written.
LIST_START = "1."
DOMAIN, AGAINST, FOLLOW_UP = "domain", "against", "follow-up"

# kind -> what the generator is asked to list (a topic is appended)
GENERAL = {
    "open question": "open questions people ask about {topic}",
    "how-to": "questions asking how to do something practical, about {topic}",
    "short fact": "short factual questions about {topic} that have a one-word answer",
    "arithmetic": "arithmetic word problems about {topic}, each with numbers in it",
    "multiple choice": "multiple-choice questions about {topic}, each with options A, B, C and D "
                       "on the same line",
    "classification": "requests to classify a short quoted sentence about {topic} as positive or "
                      "negative",
    "format": "requests about {topic} that demand a strict answer format (one word, a list of "
              "three items, JSON, or fewer than ten words)",
    "code": "requests to write or explain a short piece of Python code for a task about {topic}",
    "chit-chat": "friendly casual messages someone might send to a chat assistant about {topic}",
}
TOPICS = ("cooking", "travel", "animals", "space", "history", "gardening", "music", "sports",
          "money", "health", "school", "weather", "computers", "books", "cars", "the ocean",
          "shopping", "holidays", "work", "family", "films", "art", "science", "games")
KINDS = (DOMAIN, AGAINST, *GENERAL, FOLLOW_UP)

REASONS = {
    "short": "fewer than 3 words", "long": "more than 60 words or 400 characters",
    "language": "not English", "voice": "not a user message (the generator's own voice)",
    "fragment": "a heading or a fragment of a list",
    "leak": "leaks the prompt", "duplicate": "a near duplicate of another generated message",
    "evaluation": "a near duplicate of an evaluation item, drift turn, probe or held-out context",
}
_ENGLISH = frozenset("the a an is are what how why do does can you i my to of in for and with "
                     "me your it this that which who when where please".split())
_VOICE = re.compile(r"^((sure|certainly|of course|here (is|are)|here's|as an ai|i am an ai|"
                    r"i'm an ai|the (user|assistant)|a user|users? (might|may|would|could)|"
                    r"this message (is a continuation|could be a|would be a))\b|"
                    r"(answer|response|assistant|the (first|second|third|next) message):)|"
                    r"numbered list|\bthe ai\b", re.IGNORECASE)
_LEAK = re.compile(r"\b(system prompt|these instructions|your instructions|was given)\b",
                   re.IGNORECASE)
_ITEM = re.compile(r"^\s*(\d{1,2})[.)]\s+(.+?)\s*$")


class GenerationError(ValueError):
    """Generation yielded nothing usable, or the generator cannot be used; says why."""


@dataclasses.dataclass
class Generated:
    """Generated contexts with their kinds, and what generation wrote, dropped and why."""

    contexts: list[Context]
    kinds: list[str]
    written: int  # candidate messages parsed from the generator's lists
    dropped: dict[str, int]  # reason -> count (see REASONS)
    examples: dict[str, list[str]]  # reason -> a few dropped candidates
    settings: dict
    seconds: float = 0.0
    cached: bool = False

    def summary(self) -> str:
        counts = {k: self.kinds.count(k) for k in dict.fromkeys(self.kinds)}
        dropped = ", ".join(f"{n} {REASONS[r]}" for r, n in self.dropped.items() if n)
        return (f"{len(self.contexts)} contexts ({', '.join(f'{n} {k}' for k, n in counts.items())}"
                f") from {self.written} written; dropped: {dropped or 'none'}"
                + (" (cached)" if self.cached else f"; {self.seconds:.0f} s"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Generated:
        return cls(**data)

    def save_jsonl(self, path: str | Path) -> None:
        """One JSON line per context (``{"user": ..., "kind": ...}`` or ``{"messages": [...],
        "kind": ...}``), which ``--contexts FILE`` reads back; written to a temporary name first."""
        lines = [json.dumps({**({"user": c[0]["content"]} if len(c) == 1 else {"messages": c}),
                             "kind": k}, ensure_ascii=False)
                 for c, k in zip(self.contexts, self.kinds)]
        files.write_text(Path(path), "\n".join(lines) + "\n")


def readable(prompt) -> str:
    """The prompt as the generator reads it: the system text, then any demonstration turns."""
    messages = prompt_messages(prompt)
    return "\n".join(m["content"] if m["role"] == "system" else
                     f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def candidates(text: str, limit: int = 5) -> list[str]:
    """The items of the first numbered list in ``text`` (at most ``limit``), quotes and list
    markers removed; the list ends where numbering restarts or breaks."""
    found, expected = [], 1
    for line in text.splitlines():
        match = _ITEM.match(line)
        if not match:
            continue
        if int(match.group(1)) != expected:
            if found:
                break
            continue
        item = re.sub(r"^(\d{1,2}[.)]\s+)+", "", match.group(2))  # "1. 1. ..." written twice
        item = item.strip().strip('"\u201c\u201d').strip()
        item = re.sub(r"^(user|message|question|request)\s*\d*\s*:\s*", "", item, flags=re.IGNORECASE)
        found.append(item)
        expected += 1
        if len(found) == limit:
            break
    return found


def refusal(text: str, prompt_words: frozenset[str], prompt_text: str,
            language: str | None = "en") -> str | None:
    """Why a candidate is not a usable user message (a key of ``REASONS``), or None."""
    words = text.split()
    if len(words) < 3:
        return "short"
    if len(words) > 60 or len(text) > 400:
        return "long"
    letters = [c for c in text if c.isalpha()]
    if language == "en" and (sum(not c.isascii() for c in letters) > 0.1 * len(letters)
                             or not _ENGLISH & {w.strip("?,.!:;").lower() for w in words}):
        return "language"
    if _VOICE.search(text):
        return "voice"
    if text.endswith(":") or re.search(r"\s\d{1,2}\.\s", text) or re.match(r"^[A-D][:)]\s", text):
        return "fragment"
    mine = contexts_mod.content_words(text)
    shared = mine & prompt_words
    if _LEAK.search(text) or _shares_run(text, prompt_text, 8) or \
            (len(shared) >= 4 and len(shared) >= 0.6 * len(mine)):
        return "leak"
    return None


def _shares_run(text: str, other: str, n: int) -> bool:
    words = lambda s: re.findall(r"[a-z0-9']+", s.lower())
    a, b = words(text), words(other)
    runs = {tuple(b[i:i + n]) for i in range(len(b) - n + 1)}
    return any(tuple(a[i:i + n]) in runs for i in range(len(a) - n + 1))


def reserved() -> list[str]:
    """What generated contexts must not repeat: every item of the shipped tasks, the scripted
    drift turns, the off-distribution probes and the shipped held-out contexts."""
    items = [item["prompt"] for name in TASKS for item in load_task(name).items]
    turns = [t for lines in drift.user_turns().values() for t in lines]
    probes = [" ".join(m["content"] for m in c) for c in contexts_mod.probe()]
    held_out = [c[0]["content"] for c in contexts_mod.builtin("held_out")]
    return items + turns + probes + held_out


def quotas(n: int, kinds: tuple[str, ...], domain_share: float) -> dict[str, int]:
    """How many contexts of each kind make ``n``: ``domain_share`` of them from the domain (one
    in eight of those against it), the rest spread over the general kinds."""
    domain = [k for k in kinds if k in (DOMAIN, AGAINST)]
    general = [k for k in kinds if k not in (DOMAIN, AGAINST)]
    share = domain_share if domain and general else float(bool(domain))
    weights = {}
    for k in domain:
        weights[k] = share * ((7 / 8 if AGAINST in domain else 1) if k == DOMAIN else
                              (1 / 8 if DOMAIN in domain else 1))
    weights.update({k: (1 - share) / len(general) for k in general})
    return contexts_mod.largest_remainder(n, weights)


def _request(kind: str, prompt: str, topic: str) -> str:
    if kind == DOMAIN:
        return (f'An AI assistant was given these instructions:\n"""\n{prompt}\n"""\nWrite a '
                f"numbered list of 5 different messages that its users send to it, on different "
                f"subjects. Write only the messages.")
    if kind == AGAINST:
        return (f'An AI assistant was given these instructions:\n"""\n{prompt}\n"""\nWrite a '
                f"numbered list of 5 messages in which a user asks it to do something against "
                f"these instructions (to drop its style or its role, or to help with something "
                f"outside its purpose). Write only the messages.")
    return f"Write a numbered list of 5 {GENERAL[kind].format(topic=topic)}."


def generate(model, tokenizer, prompt, n: int, *, kinds: tuple[str, ...] = KINDS,
             domain_share: float = 0.5, seed: int = 0, temperature: float = 0.8,
             top_p: float = 0.95, max_new_tokens: int = 128, language: str | None = "en",
             rounds: int = 4, batch_size: int = 64, say=None) -> Generated:
    """``n`` user messages written by ``model`` (used as it stands: pass a baked model with its
    adapter off) for ``prompt``, in ``quotas(n, kinds, domain_share)``. Each round asks for
    lists of the kinds still short, with fresh topics; after ``rounds`` rounds what was found is
    returned (fewer than ``n`` if the generator kept writing unusable messages; none raises
    ``GenerationError`` with what was dropped and why)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or n < 1 or not 0 <= domain_share <= 1:
        raise ValueError(f"kinds={kinds!r}, n={n}, domain_share={domain_share}: kinds are "
                         f"{', '.join(KINDS)}, n >= 1 and domain_share in [0, 1]")
    settings = {"n": n, "kinds": list(kinds), "domain_share": domain_share, "seed": seed,
                "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "language": language, "rounds": rounds, "recipe": RECIPE}
    start, rng = time.perf_counter(), random.Random(seed)
    text = readable(prompt)
    prompt_words = contexts_mod.content_words(text)
    framing = Framing(tokenizer, "generator", "default")  # the student side: the model as used
    render = lambda message: framing.student_ids([{"role": "user", "content": message}])
    sampling = SamplingConfig(1, max_new_tokens, temperature, top_p, batch_size)
    stops, pad_id = stop_token_ids(tokenizer, model), tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    want = quotas(n, kinds, domain_share)
    taken: dict[str, list[Context]] = {k: [] for k in want}
    dropped = {r: 0 for r in REASONS}
    examples: dict[str, list[str]] = {r: [] for r in REASONS}
    accepted: list[str] = []  # first messages: what follow-ups start from
    seen: list[str] = []  # every message taken, first or follow-up: what a new one must not repeat
    against = reserved()
    written = 0

    def keep(messages: list[str]) -> list[str]:
        nonlocal written
        written += len(messages)
        reasons = {m: refusal(m, prompt_words, text, language) for m in messages}
        fresh = [m for m, r in reasons.items() if r is None]
        for m, _, _ in contexts_mod.near_duplicates(fresh, against):
            reasons[m] = "evaluation"
        out = []
        for message in messages:
            reason = reasons[message]
            if reason is None and contexts_mod.near_duplicates([message], seen + out):
                reason = "duplicate"
            if reason is None:
                out.append(message)
                continue
            dropped[reason] += 1
            if len(examples[reason]) < 3:
                examples[reason].append(message)
        return out

    start_ids = tokenizer.encode(LIST_START, add_special_tokens=False)
    newline = functools.lru_cache(maxsize=None)(lambda token: "\n" in tokenizer.decode([token]))

    # An answer is decoded with the list's start in front: a sentencepiece decoder drops the
    # leading space of the first token it is given, which would make "1.How ..." of "1. How".
    def decoded(tokens: list[int]) -> str:
        return tokenizer.decode(start_ids + tokens, skip_special_tokens=True)

    def listed(tokens: list[int]) -> bool:  # five items written: what follows is not used
        return newline(tokens[-1]) and len(candidates(decoded(tokens))) == 5

    def write(requests: list[str]) -> list[str]:
        if not requests:
            return []
        found = sample(model, [render(r) + start_ids for r in requests], sampling, stops,
                       generator, cache="none", pad_id=pad_id, stop_when=listed)
        # a list cut off by max_new_tokens ends inside a message: its last line is dropped
        return [decoded(r).rpartition("\n")[0] if len(r) == max_new_tokens and r[-1] not in stops
                and not listed(r) else decoded(r) for r in found.responses]

    def take_follow_ups(pending, lists: list[str]) -> None:
        for (first, reply, _), answer in zip(pending, lists):
            for follow in keep(candidates(answer))[:2]:
                if len(taken[FOLLOW_UP]) < want[FOLLOW_UP]:
                    taken[FOLLOW_UP].append([{"role": "user", "content": first},
                                             {"role": "assistant", "content": reply},
                                             {"role": "user", "content": follow}])
                    seen.append(follow)

    pending: list[tuple[str, str, str]] = []  # follow-ups asked in the next round's batch
    for round_ in range(rounds):
        short = {k: want[k] - len(taken[k]) for k in want if len(taken[k]) < want[k]}
        if not short:
            break
        if say:
            say(f"generating contexts, round {round_ + 1}: "
                f"{sum(short.values())} still wanted")
        # A list of five gives about two usable messages; after the first round the few lists
        # still needed cost about as much as twice as many (a small batch is bound by its
        # steps, not its rows), so they are asked for twice over, to make another round rare.
        requests = [(k, _request(k, text, rng.choice(TOPICS)))
                    for k, m in short.items() if k != FOLLOW_UP
                    for _ in range(math.ceil(m / 2) if round_ == 0 else m)]
        written_now = write([r for _, r in requests] + [r for _, _, r in pending])
        for (kind, _), answer in zip(requests, written_now):
            for message in keep(candidates(answer)):
                if len(taken[kind]) < want[kind]:
                    taken[kind].append([{"role": "user", "content": message}])
                    accepted.append(message)
                    seen.append(message)
        take_follow_ups(pending, written_now[len(requests):])
        missing = want.get(FOLLOW_UP, 0) - len(taken.get(FOLLOW_UP, ()))
        pending = _follow_up_requests(model, tokenizer, render, accepted, missing, rng, stops,
                                      pad_id) if missing > 0 else []
    if pending:  # asked for after the last round: written on their own
        take_follow_ups(pending, write([r for _, _, r in pending]))
    contexts = [c for k in want for c in taken[k]]
    result = Generated(contexts, [k for k in want for _ in taken[k]], written, dropped, examples,
                       settings, time.perf_counter() - start)
    if not contexts:
        raise GenerationError(
            f"the generator wrote {written} candidate messages and none was usable "
            f"({', '.join(f'{c} {REASONS[r]}' for r, c in dropped.items() if c) or 'no lists'}"
            f"{_examples(examples)}): name a stronger generator (--generator MODEL_DIR), or give "
            f"contexts from a file")
    return result


def _examples(examples: dict[str, list[str]]) -> str:
    shown = [f"{REASONS[r]}: {t[0]!r}" for r, t in examples.items() if t]
    return "; for example " + "; ".join(shown[:3]) if shown else ""


def _follow_up_requests(model, tokenizer, render, accepted, count, rng, stops, pad_id):
    """Requests for three-turn contexts, as (first, answer, request): an accepted first
    message, the generator's own unprompted answer, and the request to list what the user
    would say next (asked in the next round's batch, or after the last round on their own; each
    list of five gives up to two)."""
    firsts = rng.sample(accepted, min(len(accepted), count))
    if not firsts:
        return []
    answers = greedy(model, [render(f) for f in firsts], max_new_tokens=48, stop_ids=stops,
                     pad_id=pad_id)
    answers = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    return [(f, a, f"Here is the start of a conversation.\nUser: {f}\nAssistant: {a}\nWrite a "
                   f"numbered list of 5 different follow-up messages the user might send next. "
                   f"Write only the messages.") for f, a in zip(firsts, answers) if a]


def cache_key(fingerprint: str, prompt, settings: dict) -> str:
    return hashlib.sha256(json.dumps([fingerprint, prompt_messages(prompt), settings],
                                     sort_keys=True).encode()).hexdigest()


def generated_contexts(prompt, n: int, *, model: str | Path | None = None,
                       generator: str | Path | None = None, loaded=None, cache: bool = True,
                       say=None, **settings) -> Generated:
    """``generate`` with its cache: the generator is ``generator`` (a model directory), else
    ``model`` (the model to bake, default SmolLM2-135M-Instruct); ``loaded`` = (model,
    tokenizer) already in memory for it. The cache file holds the contexts and the report."""
    source = generator if generator is not None else model
    if generator is not None and not Path(generator).expanduser().is_dir():
        raise GenerationError(f"generator model {generator} is not a directory: give a local "
                              f"model directory (config.json, tokenizer and safetensors weights), "
                              f"or leave --generator out to let the baked model write contexts")
    directory = models.resolve(source)
    defaults = {p: v.default for p, v in _GENERATE_DEFAULTS.items()}
    full = {**defaults, **settings, "n": n, "recipe": RECIPE}
    key = cache_key(models.fingerprint(directory), prompt, full)
    path = models.cache_root() / "contexts" / f"{key}.json"
    if cache and path.is_file():
        try:
            found = Generated.from_dict(json.loads(path.read_text("utf-8")))
            found.cached = True
            return found
        except (ValueError, TypeError):
            pass  # a damaged cache entry is made again
    if loaded is None or generator is not None:
        lm, tokenizer, _ = models.load(directory)
    else:
        lm, tokenizer = loaded
    with torch.no_grad():
        found = generate(lm, tokenizer, prompt, n, say=say, **settings)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path, files.to_json(found.to_dict()))
    return found


_GENERATE_DEFAULTS = {name: p for name, p in inspect.signature(generate).parameters.items()
                      if p.kind == p.KEYWORD_ONLY and name != "say"}


GENERATED = "generated:"
POOL_KINDS = {"generated-domain": (DOMAIN, AGAINST),
              "generated-general": (*GENERAL, FOLLOW_UP)}


def check_spec(spec):
    """``spec`` with pools parsed (``contexts.Pools``) and ``generated:N`` checked, so that a bad
    one is refused before a bake loads anything."""
    if isinstance(spec, str) and spec.startswith(GENERATED):
        _count(spec)
        return spec
    if contexts_mod.is_pools(spec) and not isinstance(spec, contexts_mod.Pools):
        return contexts_mod.Pools(spec)
    return spec


def _count(spec: str) -> int:
    count = spec[len(GENERATED):]
    if not (count.isdigit() and int(count) >= 1):
        raise contexts_mod.ContextError(f"--contexts {spec}: write generated:N with N a whole "
                                        f"number >= 1, e.g. generated:200")
    return int(count)


def resolve(spec, prompt, loaded, model_dir, seed: int, counts: tuple[int, int], say=None):
    """(contexts spec for ``contexts.for_bake``, what generation did or None) for a bake:
    ``"generated:N"`` becomes the N generated contexts (hash-split into train and held-out),
    generated pools of ``Pools`` are filled (N or enough for the pool's share of ``counts``, the
    bake's training and held-out context counts); any other spec is returned as it is."""
    if isinstance(spec, str) and spec.startswith(GENERATED):
        found = generated_contexts(prompt, _count(spec), model=model_dir, loaded=loaded, seed=seed,
                                   say=say)
        return found.contexts, _record(found)
    if not contexts_mod.is_pools(spec):
        return spec, None
    pools = spec if isinstance(spec, contexts_mod.Pools) else contexts_mod.Pools(spec)
    records = {}
    total = sum(pools.weights.values())
    for name, asked in pools.generated().items():
        pool = contexts_mod.generated_pool(name)[0]
        share = pools.weights[name] / total
        # enough for its shares after the 80/20 hash split, with room for the split's luck
        n = asked or math.ceil(max(share * counts[0] / 0.7, share * counts[1] / 0.15))
        found = generated_contexts(prompt, n, model=model_dir, loaded=loaded, seed=seed,
                                   kinds=POOL_KINDS[pool], domain_share=float(pool.endswith(
                                       "domain")), say=say)
        pools.fill(name, found.contexts)
        records[name] = _record(found)
    return pools, records or None


def _record(found: Generated) -> dict:
    return {"contexts": len(found.contexts), "written": found.written, "dropped": found.dropped,
            "settings": found.settings, "seconds": round(found.seconds, 2),
            "cached": found.cached}

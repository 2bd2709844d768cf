"""Baking a tool: the tool documentation and demonstrations baked away, so the model without
them still calls the tool and uses its result.

``bake_tools`` renders the prompt u from tool specs (``tools.render``: a system message with the
documentation and call syntax, then demonstration turns user -> call -> result -> answer) and
bakes it with ``promptbake.bake`` on contexts of three kinds: questions that need a tool,
questions to answer without one, and conversations that already hold a call and its executed
result, so that the baked model also learns what to do with a result. The third kind is made by
the prompted model itself: it answers the tool questions, its calls run in the registry, and the
conversation up to the result becomes a context (a call the model got wrong gets the result, or
the error, a real system would give).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from promptbake import contexts as contexts_mod, models, tools
from promptbake.artifact import Baked
from promptbake.bake import bake
from promptbake.config import BakeConfig
from promptbake.tools.spec import check_set

log = logging.getLogger("promptbake")

SHIPPED = "shipped"
# The loss weight of a response's first token in a tool bake (BakeConfig.first_token_weight),
# where the call-or-answer decision is made: weighing 1, like every other token, the baked model
# learned the teacher's wording and rarely called on held-out questions (README, "Baking a tool").
TOOL_FIRST_TOKEN_WEIGHT = 8.0
# A tool bake's defaults where they differ from a prompt bake's (BakeConfig): twice the distinct
# questions with one sample each, for the same number of trajectories -- the call decision is
# learned from the variety of questions, not from more answers to each (README, "Baking a tool":
# 60% and 70% of the prompt's end-to-end gain recovered in two runs, against -20% with 144 x 2).
# The long tool prompt is encoded once for all of them (trajectories.sample), so sampling costs
# less than 144 x 2 did before. And twice a prompt bake's epochs: held-out KL 74.4% -> 78.3%,
# 70% -> 80% of the gain recovered (tools bench, 2026-12-05), for twice the training time.
TOOL_DEFAULTS = {"first_token_weight": TOOL_FIRST_TOKEN_WEIGHT, "train_contexts": 288,
                 "samples_per_context": 1, "epochs": 8.0}


def tool_config(**fields) -> BakeConfig:
    """A tool bake's settings: ``BakeConfig`` with ``TOOL_DEFAULTS``, then ``fields``."""
    config = BakeConfig(**{**TOOL_DEFAULTS, **fields})
    config.validate()
    return config


def tool_specs(source) -> list[tools.ToolSpec]:
    """Specs from ``source``: a JSON file (``tools.load_specs``), a list of ToolSpecs,
    ``"shipped"`` (every shipped tool) or ``"shipped:NAME,NAME"`` (some of them)."""
    if isinstance(source, list):
        return check_set(source)
    text = str(source)
    if text == SHIPPED or text.startswith(SHIPPED + ":"):
        found = tools.shipped.specs()
        names = [n.strip() for n in text.partition(":")[2].split(",") if n.strip()]
        unknown = sorted(set(names) - {s.name for s in found})
        if unknown:
            raise ValueError(f"no shipped tool named {', '.join(unknown)}: the shipped tools are "
                             f"{', '.join(s.name for s in found)}")
        return [s for s in found if not names or s.name in names]
    return tools.load_specs(Path(source))


def tool_contexts(model, tokenizer, prompt, questions: list, specs, registry, *,
                  syntax: str = tools.rendering.DEFAULT_SYNTAX, framing: str = "default",
                  max_new_tokens: int = 64) -> list[list[dict]]:
    """Conversations that hold a call and its executed result: the prompted model answers each
    of ``questions`` (contexts of one user message); where it calls a tool, the conversation
    up to the result is kept."""
    texts = [q[-1]["content"] if isinstance(q, list) else str(q) for q in questions]
    exchanges = tools.converse(model, tokenizer, texts, specs=specs, registry=registry,
                               system=prompt, framing=framing, syntax=syntax,
                               max_new_tokens=max_new_tokens, max_rounds=1)
    return [ex.after_results for ex in exchanges if ex.after_results is not None]


def bake_contexts(model, tokenizer, prompt, specs, registry: tools.Registry, contexts=None, *,
                  syntax: str = tools.rendering.DEFAULT_SYNTAX, framing: str = "default",
                  max_new_tokens: int = 64) -> tuple[list, dict]:
    """(the contexts a tool bake trains on, how many of each kind): the questions of
    ``contexts`` (see ``bake_tools``) interleaved with the conversations that hold a call and its
    executed result (``tool_contexts``, written by ``model`` prompted with ``prompt``)."""
    singles = _questions(contexts)
    asking = [c for c, tool in singles if tool] or [c for c, _ in singles]
    with_results = tool_contexts(model, tokenizer, prompt, asking, specs, registry,
                                 syntax=syntax, framing=framing, max_new_tokens=max_new_tokens)
    log.info("promptbake: %d questions and %d conversations with a tool result to bake on",
             len(singles), len(with_results))
    return (_interleave([c for c, _ in singles], with_results),
            {"questions": len(singles), "with_results": len(with_results)})


def bake_tools(source=SHIPPED, model=None, contexts=None, config: BakeConfig | None = None, *,
               registry: tools.Registry | None = None,
               syntax: str = tools.rendering.DEFAULT_SYNTAX, out=None, overwrite: bool = False,
               resume: bool = False, progress: bool = False, fsdp: bool = False,
               device: str | None = None) -> Baked:
    """Bakes the tool prompt rendered from ``source`` (see ``tool_specs``) into ``model``.

    Args:
        contexts: the user messages to bake on (default: the shipped tool training contexts,
            tool questions and others); the ones naming a tool (``{"user": ..., "tool": ...}``
            in a .jsonl file, or every message when none does) also give a conversation with
            the call's result.
        config: the bake's settings (default: ``tool_config()``; build yours with
            ``tool_config(epochs=...)`` to keep the other tool defaults). A first-token weight
            left None weighs ``TOOL_FIRST_TOKEN_WEIGHT``.
        registry: runs the calls (default: the shipped tools); a tool without a function in it
            gets an error result, so register your own tools for results to mean anything.
    """
    config = config or tool_config()
    config.validate()
    if config.first_token_weight is None:
        config = dataclasses.replace(config, first_token_weight=TOOL_FIRST_TOKEN_WEIGHT)
    specs = tool_specs(source)
    registry = registry or tools.shipped.registry()
    unregistered = [s.name for s in specs if s.name not in registry]
    if unregistered:
        log.warning("promptbake: no function is registered for %s: calls to them get an error "
                    "result in the conversations baked on", ", ".join(unregistered))
    lm, tokenizer, model_dir = models.load(model)
    prompt = tools.render(specs, tokenizer, syntax)
    mixed, counts = bake_contexts(lm, tokenizer, prompt, specs, registry, contexts,
                                  syntax=syntax, framing=config.framing,
                                  max_new_tokens=config.max_new_tokens)
    del lm
    described = [s.to_dict() for s in specs]
    record = {"tools": {
        "specs": described, "syntax": syntax,
        "sha256": hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest(),
        "contexts": counts}}
    return bake(prompt, model=model_dir, contexts=mixed, config=config, out=out,
                overwrite=overwrite, resume=resume, progress=progress, record=record,
                fsdp=fsdp, device=device)


def _questions(contexts) -> list[tuple[list[dict], str | None]]:
    """(context, the tool it needs or None) of each question to bake on: the shipped tool
    questions (None), a contexts file (a .jsonl line ``{"user": ..., "tool": ...}`` names its
    tool) or a list of contexts."""
    if contexts is None:
        rows = tools.shipped.train_rows()
    elif isinstance(contexts, (str, Path)) and Path(contexts).is_file():
        rows = []
        if str(contexts).endswith(".jsonl"):
            rows = [json.loads(line) for line in Path(contexts).read_text(encoding="utf-8")
                    .splitlines() if line.strip()]
        if not rows or not all(isinstance(r, dict) and "user" in r for r in rows):
            return [(c, None) for c in contexts_mod.load(contexts)]
    elif isinstance(contexts, list):
        return [([{"role": "user", "content": c}] if isinstance(c, str) else list(c), None)
                for c in contexts]
    else:
        raise ValueError(f"contexts={contexts!r}: a tool bake takes a contexts file, a list of "
                         f"contexts, or None for the shipped tool questions")
    return [([{"role": "user", "content": r["user"]}], r.get("tool")) for r in rows]


def _interleave(first: list, second: list) -> list:
    """Both lists, the second spread evenly through the first (so any prefix holds both)."""
    return tools.shipped.interleave([first, second])

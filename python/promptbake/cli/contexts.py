"""``promptbake contexts generate``: user messages the model writes for a prompt."""

from __future__ import annotations

from pathlib import Path

from promptbake import generated
from promptbake.cli.arguments import Help, read_prompt, split_list


def register(commands) -> None:
    p = commands.add_parser("contexts", help="make contexts to bake on",
                            description="Make contexts (user messages) to bake on.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True,
                           help="generate: user messages the model writes for a prompt")
    g = sub.add_parser(
        "generate", help="user messages the model writes for a prompt",
        description="The model (or --generator) reads the prompt and lists messages its users "
                    "would send (domain, and a few against its instructions), and messages of "
                    "general kinds (open questions, how-to, short facts, arithmetic, multiple "
                    "choice, classification, format instructions, code, chit-chat, multi-turn "
                    "follow-ups). Candidates that are too short or long, not English, in the "
                    "generator's own voice, leak the prompt, repeat each other, or repeat an "
                    "evaluation item, drift turn, probe or held-out context are dropped and "
                    "counted. Cached by generator, prompt and settings. Bake on the file with "
                    "--contexts FILE, or let the bake generate with --contexts generated:N.",
        formatter_class=Help)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt the contexts are for")
    what.add_argument("--prompt-file", help="read the prompt from this file (.json: a "
                                            "conversation of chat messages)")
    g.add_argument("--n", type=int, default=200, help="how many contexts")
    g.add_argument("--out", required=True, help="JSON-lines file to write (one context a line)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--model", default=None,
                   help="the model to bake, which writes them unless --generator is given "
                        "(default: SmolLM2-135M-Instruct)")
    g.add_argument("--generator", default=None, help="another local model directory to write "
                                                      "them")
    g.add_argument("--kinds", default="all",
                   help="'all', 'domain' (the prompt's own and against it), 'general', or a "
                        f"comma-separated list of: {', '.join(generated.KINDS)}")
    g.add_argument("--domain-share", type=float, default=0.5,
                   help="share of domain contexts when both domain and general kinds are asked")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    g.add_argument("--no-cache", action="store_true", help="generate again even if cached")
    g.set_defaults(run=_generate)


def kinds_of(text: str) -> tuple[str, ...]:
    """The kinds an option names: all, domain, general, or a list of kinds."""
    named = {"all": generated.KINDS, "domain": (generated.DOMAIN, generated.AGAINST),
             "general": (*generated.GENERAL, generated.FOLLOW_UP)}
    if text in named:
        return named[text]
    kinds = tuple(split_list(text))
    unknown = [k for k in kinds if k not in generated.KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown context kinds {unknown or text!r}: use all, domain, general, "
                         f"or some of: {', '.join(generated.KINDS)}")
    return kinds


def _generate(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} is a directory: give a file name")
    if args.n < 1:
        raise ValueError(f"--n {args.n}: ask for at least one context")
    found = generated.generated_contexts(
        read_prompt(args), args.n, model=args.model, generator=args.generator,
        kinds=kinds_of(args.kinds), domain_share=args.domain_share, seed=args.seed,
        temperature=args.temperature, cache=not args.no_cache, say=print)
    found.save_jsonl(out)
    print(found.summary())
    for reason, examples in found.examples.items():
        if examples:
            print(f"  dropped as {generated.REASONS[reason]}: {examples[0]!r}")
    if len(found.contexts) < args.n:
        print(f"only {len(found.contexts)} of {args.n} asked for were usable; ask for more, or "
              f"name a stronger --generator")
    print(f"wrote {out}; bake on it with --contexts {out}")
    return 0

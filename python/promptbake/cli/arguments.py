"""What the commands share: the help formatter, reading a prompt, printing a score."""

from __future__ import annotations

import argparse

from promptbake.formatting import pm
from promptbake.framing import read_prompt_file


class Help(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when X says something: not for None or False
    defaults, nor where the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text \
                or action.option_strings == [] or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


def read_prompt(args) -> str | list:
    """The prompt of ``--prompt`` or ``--prompt-file`` (``framing.read_prompt_file``)."""
    if args.prompt_file is not None:
        return read_prompt_file(args.prompt_file)
    return args.prompt


def score_line(result) -> str:
    """A task's score with its error, and chance where it is known."""
    chance = "" if result.chance is None else f"   (chance {result.chance:.3f})"
    return f"{pm(result.value, result.se, '.3f')}{chance}"


def add_teacher_model(p, measured: str) -> None:
    """``--teacher-model``, for commands that measure a bake against its prompted model."""
    p.add_argument("--teacher-model", default=None,
                   help=f"for a bake made with --teacher-model: that teacher's directory, if it "
                        f"moved ({measured} against the teacher the bake learned from, with "
                        f"the prompt; its weights must match the manifest's sha256)")


def teacher_for(args, baked):
    """``mc_kl.teacher_of`` for a command's bake and its ``--teacher-model``, said when loaded."""
    from promptbake.mc_kl import teacher_of

    teacher = teacher_of(baked, args.teacher_model)
    if teacher is not None:
        print(f"teacher: {baked.manifest['teacher_model']['name']} with the prompt (the model "
              f"this bake learned from)", flush=True)
    return teacher


def split_list(text: str) -> list[str]:
    """The items of a comma-separated option, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def float_list(text: str, flag: str) -> list[float]:
    """The numbers of a comma-separated option such as ``--strength 0,0.5,1``; an item that is
    no number is an error that names ``flag``."""
    out = []
    for item in split_list(text):
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f"{flag} {text}: {item!r} is not a number (give numbers separated "
                             f"by commas, e.g. 0,0.5,1)") from None
    if not out:
        raise ValueError(f"{flag} {text!r}: give at least one number")
    return out

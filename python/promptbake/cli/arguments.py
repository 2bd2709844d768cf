"""What the commands share: the help formatter, reading a prompt, printing a score."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from promptbake.formatting import pm
from promptbake.framing import prompt_messages


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
    """The prompt of ``--prompt`` or ``--prompt-file`` (UTF-8): the file's text, or, for a
    ``.json`` file, a conversation (a JSON list of chat messages)."""
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
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
            raise ValueError(f"{path} is not valid JSON ({err}): a .json prompt file holds a "
                             f"list of chat messages") from err
        prompt_messages(messages)  # names the message that is not one
        return messages
    return args.prompt


def score_line(result) -> str:
    """A task's score with its error, and chance where it is known."""
    chance = "" if result.chance is None else f"   (chance {result.chance:.3f})"
    return f"{pm(result.value, result.se, '.3f')}{chance}"


def split_list(text: str) -> list[str]:
    """The items of a comma-separated option, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]

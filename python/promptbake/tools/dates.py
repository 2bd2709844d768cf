"""DAYS_BETWEEN and WEEKDAY: date arithmetic on ISO dates (YYYY-MM-DD, proleptic Gregorian
calendar, years 1 to 9999)."""

from __future__ import annotations

import datetime

from promptbake.tools.registry import ToolError

ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def parse_date(text: str) -> datetime.date:
    """``text`` (YYYY-MM-DD) as a date; ToolError for anything else."""
    try:
        if not isinstance(text, str) or len(text.strip()) != 10:
            raise ValueError
        return datetime.date.fromisoformat(text.strip())
    except ValueError as err:
        raise ToolError(f"{text!r} is not a date written YYYY-MM-DD (such as 2024-03-01)") from err


def days_between(start: str, end: str) -> str:
    """The number of days from ``start`` to ``end`` (negative if ``end`` is earlier)."""
    days = (parse_date(end) - parse_date(start)).days
    return f"{days} day" if abs(days) == 1 else f"{days} days"


def weekday(date: str) -> str:
    """The day of the week of ``date``, e.g. ``Friday``."""
    return WEEKDAYS[parse_date(date).weekday()]

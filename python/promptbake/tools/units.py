"""CONVERT: a quantity from one unit to another of the same kind (length, mass, volume,
temperature, time, speed). US customary units for volume (gallon, cup, fluid ounce)."""

from __future__ import annotations

from decimal import Decimal

from promptbake.tools.registry import ToolError

# unit -> (kind, factor to the kind's base unit); temperature is converted apart (offsets)
FACTORS = {
    "mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0),
    "km": ("length", 1000.0), "in": ("length", 0.0254), "ft": ("length", 0.3048),
    "yd": ("length", 0.9144), "mi": ("length", 1609.344),
    "mg": ("mass", 1e-6), "g": ("mass", 0.001), "kg": ("mass", 1.0),
    "oz": ("mass", 0.028349523125), "lb": ("mass", 0.45359237),
    "ml": ("volume", 0.001), "l": ("volume", 1.0), "fl_oz": ("volume", 0.0295735295625),
    "cup": ("volume", 0.2365882365), "gal": ("volume", 3.785411784),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "week": ("time", 604800.0),
    "m/s": ("speed", 1.0), "km/h": ("speed", 1000 / 3600), "mph": ("speed", 1609.344 / 3600),
    "C": ("temperature", None), "F": ("temperature", None), "K": ("temperature", None),
}
UNITS = tuple(FACTORS)
MAX_VALUE = 1e15


def convert(value: float, from_unit: str, to_unit: str) -> str:
    """``value`` in ``from_unit`` as ``to_unit``, e.g. ``5 km = 3.11 mi`` (see ``rounded``)."""
    for unit in (from_unit, to_unit):
        if unit not in FACTORS:
            raise ToolError(f"unknown unit {unit!r}; the units are {', '.join(UNITS)}")
    (kind, factor), (to_kind, to_factor) = FACTORS[from_unit], FACTORS[to_unit]
    if kind != to_kind:
        raise ToolError(f"cannot convert {kind} ({from_unit}) to {to_kind} ({to_unit})")
    if abs(value) > MAX_VALUE:
        raise ToolError(f"{value} is beyond the converter's range (at most {MAX_VALUE:g})")
    if kind == "temperature":
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        if kelvin < -1e-9:
            raise ToolError(f"{value} {from_unit} is below absolute zero")
        result = {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
    else:
        result = value * factor / to_factor
    return f"{rounded(value)} {from_unit} = {rounded(result)} {to_unit}"


def rounded(value: float) -> str:
    """Two decimals, or three significant digits below 0.1 (a converted quantity is an
    approximation; a short number is one a model can copy)."""
    if value != 0 and abs(value) < 0.1:
        return format(Decimal(f"{value:.3g}"), "f")
    text = f"{round(value, 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text

"""Writes the shipped tool data: the specs (tools.json), the held-out test items (tests/*.jsonl,
no_tool.jsonl) and the contexts to bake on (train.jsonl).

    python python/promptbake/data/tools/generate.py

Every expected value is computed by the shipped tools themselves. Test items and training
contexts come from different wordings, different operands, unit pairs, dates and countries,
and the script refuses to write anything that ``promptbake.contexts.near_duplicates`` finds
shared between the training contexts and the test items, between the demonstrations and the
test items, or between the training contexts and the shipped task suite. The output is the
same on every run (seeded).
"""

from __future__ import annotations

import datetime
import json
import random
import re
from pathlib import Path

from promptbake import files
from promptbake.contexts import near_duplicates
from promptbake.tasks import TASKS
from promptbake.tools import calculator, dates, lookup, units
from promptbake.tools.calls import Call
from promptbake.tools.spec import Example, ToolSpec, specs_from

HERE = Path(__file__).parent
COUNTS = {"CALC": 60, "CONVERT": 45, "DAYS_BETWEEN": 30, "WEEKDAY": 25, "LOOKUP": 50}
TRAIN_COUNTS = {"CALC": 84, "CONVERT": 60, "DAYS_BETWEEN": 40, "WEEKDAY": 40, "LOOKUP": 60}

# -- the specs --------------------------------------------------------------------------------

DATE = {"type": "string", "pattern": dates.ISO_DATE, "description": "a date, YYYY-MM-DD"}
PARAMETERS = {
    "CALC": {"type": "object", "required": ["expression"], "properties": {
        "expression": {"type": "string", "description": "the expression, such as 17 * 23"}}},
    "CONVERT": {"type": "object", "required": ["value", "from_unit", "to_unit"], "properties": {
        "value": {"type": "number"},
        "from_unit": {"type": "string", "enum": list(units.UNITS)},
        "to_unit": {"type": "string", "enum": list(units.UNITS)}}},
    "DAYS_BETWEEN": {"type": "object", "required": ["start", "end"],
                     "properties": {"start": DATE, "end": DATE}},
    "WEEKDAY": {"type": "object", "required": ["date"], "properties": {"date": DATE}},
    "LOOKUP": {"type": "object", "required": ["country"], "properties": {
        "country": {"type": "string", "description": "the country's English name"},
        "field": {"type": "string", "enum": list(lookup.FIELDS), "default": "capital"}}},
}
DESCRIPTIONS = {
    "CALC": "Evaluates an arithmetic expression (+ - * / ^, parentheses, sqrt).",
    "CONVERT": "Converts a quantity from one unit to another.",
    "DAYS_BETWEEN": "Counts the days from one date to another.",
    "WEEKDAY": "Gives the day of the week of a date.",
    "LOOKUP": "Looks up a country's capital, currency, continent or calling code.",
}
FUNCTIONS = {"CALC": calculator.calculate, "CONVERT": units.convert,
             "DAYS_BETWEEN": dates.days_between, "WEEKDAY": dates.weekday,
             "LOOKUP": lookup.lookup}
# (tool, user, arguments, answer with {result}); one demonstration per tool, then a question
# to answer without any tool
EXAMPLES = [
    ("CALC", "What is 17 * 23?", {"expression": "17 * 23"}, "17 * 23 = {result}."),
    ("CONVERT", "What is 2.5 kilograms in grams?",
     {"value": 2.5, "from_unit": "kg", "to_unit": "g"}, "2.5 kilograms is 2500 grams."),
    ("DAYS_BETWEEN", "What is the number of days from 2023-01-10 to 2023-02-14?",
     {"start": "2023-01-10", "end": "2023-02-14"},
     "There are {result} from 2023-01-10 to 2023-02-14."),
    ("WEEKDAY", "Name the weekday of 1999-12-31.", {"date": "1999-12-31"},
     "1999-12-31 was a {result}."),
    ("LOOKUP", "What currency does Sweden use?", {"country": "Sweden", "field": "currency"},
     "Sweden uses the {result}."),
    ("LOOKUP", "Who wrote Romeo and Juliet?", None,
     "William Shakespeare wrote Romeo and Juliet."),
]
EXAMPLE_COUNTRIES = {"Sweden"}


def build_specs() -> list[ToolSpec]:
    examples: dict[str, list[Example]] = {name: [] for name in PARAMETERS}
    for tool, user, arguments, answer in EXAMPLES:
        if arguments is None:
            examples[tool].append(Example(user, [], [], answer))
            continue
        result = FUNCTIONS[tool](**arguments)
        examples[tool].append(Example(user, [Call(tool, arguments)], [result],
                                      answer.format(result=result)))
    return [ToolSpec(name, DESCRIPTIONS[name], PARAMETERS[name], examples[name])
            for name in PARAMETERS]


# -- items ------------------------------------------------------------------------------------

def item(id_, prompt, calls, item_checks, category, **extra) -> dict:
    return {"id": id_, "category": category, "prompt": prompt, "expected": calls,
            "checks": item_checks, **extra}


def number_check(value) -> dict:
    return {"type": "mentions_number", "value": value}


def calc_items(rng: random.Random, count: int, wordings: dict, taken: set) -> list[tuple]:
    """(prompt, allowed expressions, value) of ``count`` questions, kinds in turn."""
    kinds = list(wordings)
    found = []
    while len(found) < count:
        kind = kinds[len(found) % len(kinds)]
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(2, 60)
        if kind == "product":
            forms = [f"{a} * {b}", f"{b} * {a}", f"{a} × {b}"]
        elif kind == "sum":
            a, b = rng.randint(120, 989), rng.randint(120, 989)
            forms = [f"{a} + {b}", f"{b} + {a}"]
        elif kind == "difference":
            a, b = sorted((rng.randint(120, 989), rng.randint(120, 989)), reverse=True)
            forms = [f"{a} - {b}"]
        elif kind == "quotient":
            b = rng.choice([2, 4, 5, 8, 10, 20, 25])
            a = rng.randint(30, 999)
            forms = [f"{a} / {b}", f"{a} ÷ {b}"]
        elif kind == "power":
            a, b = rng.randint(2, 13), rng.randint(2, 5)
            forms = [f"{a} ^ {b}", f"{a} ** {b}"]
        elif kind == "mixed":
            forms = [f"{a} * {b} + {c}", f"{b} * {a} + {c}", f"{c} + {a} * {b}",
                     f"{c} + {b} * {a}", f"({a} * {b}) + {c}"]
        else:  # "grouped": (a + b) * c
            forms = [f"({a} + {b}) * {c}", f"({b} + {a}) * {c}", f"{c} * ({a} + {b})",
                     f"{c} * ({b} + {a})"]
        prompt = rng.choice(wordings[kind]).format(a=a, b=b, c=c)
        key = (kind, *sorted((a, b))) if kind in ("product", "sum") else (kind, a, b, c)
        if key in taken:
            continue
        taken.add(key)
        found.append((prompt, forms, calculator.calculate(forms[0]), kind))
    return found


UNIT_WORDS = {
    "mm": "millimeters", "cm": "centimeters", "m": "meters", "km": "kilometers", "in": "inches",
    "ft": "feet", "yd": "yards", "mi": "miles", "mg": "milligrams", "g": "grams",
    "kg": "kilograms", "oz": "ounces", "lb": "pounds", "ml": "milliliters", "l": "liters",
    "fl_oz": "fluid ounces", "cup": "cups", "gal": "gallons", "s": "seconds", "min": "minutes",
    "h": "hours", "day": "days", "week": "weeks", "m/s": "meters per second",
    "km/h": "kilometers per hour", "mph": "miles per hour", "C": "degrees Celsius",
    "F": "degrees Fahrenheit", "K": "kelvin"}
TEST_PAIRS = [("km", "mi"), ("kg", "lb"), ("C", "F"), ("l", "gal"), ("ft", "m"), ("in", "cm"),
              ("oz", "g"), ("min", "h"), ("km/h", "mph"), ("cup", "ml")]
TRAIN_PAIRS = [("mi", "ft"), ("m", "yd"), ("g", "mg"), ("K", "C"), ("week", "day"),
               ("s", "min"), ("gal", "cup"), ("m/s", "km/h"), ("lb", "oz"), ("mm", "cm")]


def convert_items(rng, count, pairs, wordings) -> list[tuple]:
    found, seen = [], set()
    while len(found) < count:
        pair = pairs[len(found) % len(pairs)]
        source, target = pair if rng.random() < 0.5 else pair[::-1]
        value = rng.choice([rng.randint(2, 250), round(rng.uniform(1, 99), 1)])
        if source in ("C", "F"):
            value = rng.randint(-20, 110)
        if (source, target, value) in seen:
            continue
        seen.add((source, target, value))
        result = units.convert(value, source, target)
        prompt = rng.choice(wordings).format(v=value, a=UNIT_WORDS[source], b=UNIT_WORDS[target])
        found.append((prompt, value, source, target, result))
    return found


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")


def written(days: tuple[datetime.date, ...], rng) -> tuple[list[str], str]:
    """``days`` all as ISO dates or all in words, at random, and which."""
    if rng.random() < 0.5:
        return [day.isoformat() for day in days], "iso"
    return [f"{MONTHS[day.month - 1]} {day.day}, {day.year}" for day in days], "written"


def two_days(rng) -> tuple[datetime.date, datetime.date]:
    first, second = sorted((random_day(rng), random_day(rng)))
    if (second - first).days > 3000:
        second = first + datetime.timedelta(days=rng.randint(5, 900))
    return first, second


def random_day(rng, first=1990, last=2030) -> datetime.date:
    start = datetime.date(first, 1, 1).toordinal()
    return datetime.date.fromordinal(rng.randint(start, datetime.date(last, 12, 31).toordinal()))


def country_rows(rng) -> tuple[list[str], list[str]]:
    """Countries for test items and for training contexts, disjoint, none a demonstration's;
    the countries the task suite asks about are never trained on."""
    asked = " ".join(i["prompt"] for task in TASKS.values() for i in task.items)
    names = [n for n in lookup.table() if n not in EXAMPLE_COUNTRIES]
    rng.shuffle(names)
    names.sort(key=lambda n: n not in asked)  # stable: the asked ones first, shuffled
    return names[:52], names[52:]


FIELD_CHECK = {
    "capital": lambda row: {"type": "contains", "value": row["capital"].split(",")[0]},
    "currency": lambda row: {"type": "contains", "value": "pound" if "pound" in row["currency"]
                             else row["currency"].split()[-1]},
    "continent": lambda row: {"type": "contains", "value": row["continent"]},
    "calling_code": lambda row: number_check(int(row["calling_code"].lstrip("+"))),
}


def lookup_items(rng, count, countries, wordings) -> list[tuple]:
    fields = lookup.FIELDS
    found = []
    for i in range(count):
        country, field = countries[i % len(countries)], fields[i % len(fields)]
        found.append((rng.choice(wordings[field]).format(x=country), country, field))
    return found


# -- wordings: held-out test items and training contexts never share one -----------------------

TEST_CALC = {
    "product": ["What is {a} * {b}?", "Calculate {a} times {b}.",
                "What is the product of {a} and {b}?", "Multiply {a} by {b}."],
    "sum": ["What is {a} + {b}?", "Calculate {a} plus {b}."],
    "difference": ["What is {a} - {b}?", "What is {a} minus {b}?"],
    "quotient": ["What is {a} divided by {b}?", "What is {a} / {b}?"],
    "power": ["What is {a} to the power of {b}?", "What is {a} ^ {b}?"],
    "mixed": ["What is {a} * {b} + {c}?", "Compute {a} * {b} + {c}."],
    "grouped": ["What is ({a} + {b}) * {c}?", "Work out ({a} + {b}) * {c}."],
}
# Training wordings: several per kind, question-style ones among them ("What is {a} multiplied
# by {b}?"), none a test template. With two or three terse wordings per kind ("Find {a} * {b}.")
# the prompted model called on 9 of 60 training questions against 28 of 60 held-out ones, and
# the bake copied it where it trained (first-token P(call) 0.115, the prompted model's 0.130)
# but not on the held-out questions (0.072 against 0.206): it learned the wordings, not the kind.
# No training wording may contain a test wording or only reorder its terms (tested).
TRAIN_CALC = {
    "product": ["Find {a} * {b}.", "I need {a} times {b}, please.", "Quick: {a} * {b}?",
                "How much is {a} multiplied by {b}?", "Can you work out {a} × {b}?",
                "What do you get when you multiply {a} and {b}?", "Please compute {a} * {b}.",
                "What is {a} multiplied by {b}?"],
    "sum": ["Add {a} and {b}.", "Find the total of {a} and {b}.", "How much is {a} + {b}?",
            "What do {a} and {b} add up to?", "Can you add {a} to {b}?",
            "Please compute {a} + {b}.",
            "What is {a} added to {b}?"],
    "difference": ["Take {b} away from {a}.", "Find {a} - {b}.", "How much is {a} take away {b}?",
                   "What is left if you subtract {b} from {a}?", "Can you work out {a} - {b}?",
                   "Please compute {a} - {b}.",
                   "What is {b} subtracted from {a}?"],
    "quotient": ["Split {a} into {b} equal parts: how big is each?", "Find {a} / {b}.",
                 "How much is {a} over {b}?", "What do you get when you divide {a} by {b}?",
                 "Can you work out {a} ÷ {b}?",
                 "If {a} is shared equally among {b} people, how much does each get?",
                 "What is {a} over {b}?"],
    "power": ["Raise {a} to the {b}th power.", "Find {a} ^ {b}.", "How much is {a} raised to {b}?",
              "Can you compute {a} ** {b}?", "Please work out {a} ^ {b} for me.",
              "What is {a} raised to the {b}th power?"],
    "mixed": ["Evaluate {a} * {b} + {c} for me.", "Find {a} * {b} + {c}.",
              "How much is {a} times {b} plus {c}?", "Can you work out {a} * {b} + {c}?",
              "What is {a} times {b}, plus {c}?"],
    "grouped": ["Evaluate ({a} + {b}) * {c} for me.", "Find ({a} + {b}) * {c}.",
                "How much is ({a} + {b}) * {c}?", "Can you work out ({a} + {b}) × {c}?",
                "What is {c} times the sum of {a} and {b}?"],
}
TEST_CONVERT = ["Convert {v} {a} to {b}.", "How many {b} are in {v} {a}?", "What is {v} {a} in {b}?"]
TRAIN_CONVERT = ["Express {v} {a} in {b}.", "Turn {v} {a} into {b}, please.",
                 "I have {v} {a}; how much is that in {b}?",
                 "How much is {v} {a} when measured in {b}?", "Can you change {v} {a} to {b}?",
                 "Please restate {v} {a} as {b}.",
                 "If something measures {v} {a}, what is that in {b}?", "What are {v} {a} when written in {b}?"]
TEST_DAYS = ["How many days are there between {a} and {b}?", "How many days is it from {a} to {b}?"]
TRAIN_DAYS = ["Count the days from {a} until {b}.",
              "Find the length in days of the stretch starting {a} and ending {b}.",
              "Can you tell me how many days separate {a} and {b}?",
              "What is the gap in days between {a} and {b}?",
              "Please count the days between {a} and {b}.",
              "I started on {a} and finished on {b}. How long was that in days?",
              "What is the count of days from {a} to {b}?",
              "What is the number of days separating {a} and {b}?"]
TEST_WEEKDAY = ["What day of the week was {d}?", "On what day of the week did {d} fall?",
                "What day of the week is {d}?"]
TRAIN_WEEKDAY = ["Which weekday is {d}?", "Tell me the weekday for {d}.", "{d}: weekday?",
                 "Can you tell me what weekday {d} was?", "I was born on {d}. Which weekday was it?",
                 "Do you know the weekday of {d}?", "Was {d} a Monday, a Friday or another day?"]
TEST_LOOKUP = {
    "capital": ["What is the capital of {x}?", "Which city is the capital of {x}?"],
    "currency": ["What currency is used in {x}?", "What is the currency of {x}?"],
    "continent": ["On which continent is {x}?", "Which continent is {x} in?"],
    "calling_code": ["What is the international calling code for {x}?",
                     "What is the phone country code of {x}?"],
}
TRAIN_LOOKUP = {
    "capital": ["Name the seat of government of {x}.", "{x}: capital?",
                "Where is the government of {x} based?", "Where do the leaders of {x} govern from?"],
    "currency": ["Tell me the money people pay with in {x}.", "{x}: currency?",
                 "Which money do they use in {x}?", "If I travel to {x}, what money will I need?"],
    "continent": ["Tell me where in the world {x} lies, by continent.", "{x}: continent?",
                  "Can you tell me the continent of {x}?", "Where in the world is {x}, by continent?"],
    "calling_code": ["Tell me the dialing prefix for phoning {x}.", "{x}: calling code?",
                     "If I phone {x} from abroad, what prefix do I dial first?",
                     "Can you tell me the dialing prefix of {x}?"],
}

NO_TOOL_TEST = [
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Write a haiku about the ocean.", None),
    ("Give me a synonym for the word 'happy'.", None),
    ("What gas do plants absorb from the air?", "carbon"),
    ("Who wrote the play Hamlet?", "Shakespeare"),
    ("Tell me a short joke about computers.", None),
    ("How do I keep my houseplants healthy?", None),
    ("What is the opposite of the word 'ancient'?", None),
    ("Describe the smell of fresh bread in one sentence.", None),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("Suggest a name for a pet goldfish.", None),
    ("Why is the sky blue?", None),
    ("What is the freezing point of water in Celsius?", 0),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("Explain what a noun is.", None),
    ("Write one sentence encouraging a friend before an exam.", None),
    ("What do bees make?", "honey"),
    ("Name a primary color.", None),
    ("What is the tallest mountain in the world?", "Everest"),
    ("How many continents are there?", 7),
    ("What does a thermometer measure?", "temperature"),
    ("Give me three tips for sleeping better.", None),
    ("Who discovered penicillin?", "Fleming"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("Write a two-line poem about rain.", None),
    ("What is the boiling point of water at sea level in Celsius?", 100),
    ("What instrument has 88 keys?", "piano"),
    ("What is the plural of 'mouse'?", "mice"),
    ("How do you say 'thank you' in Spanish?", "gracias"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Recommend a good habit for staying organized.", None),
    ("What organ pumps blood through the body?", "heart"),
    ("Tell me an interesting fact about octopuses.", None),
    ("What is the past tense of 'run'?", "ran"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("How many sides does a hexagon have?", 6),
    ("Summarize the story of Cinderella in one sentence.", None),
    ("Who is the author of 'Pride and Prejudice'?", "Austen"),
    ("What is the hardest natural substance?", "diamond"),
    ("Write a friendly greeting for a new neighbour.", None),
    ("Which ocean is the largest?", "Pacific"),
    ("What is H2O commonly called?", "water"),
    ("Give an example of a mammal that can fly.", "bat"),
    ("What is a synonym for 'big'?", None),
    ("How can I calm down when I feel stressed?", None),
    ("What do caterpillars turn into?", "butterfl"),
    ("Which festival is known for carving pumpkins?", "Halloween"),
    ("What is the opposite of 'generous'?", None),
    ("Name a famous composer of classical music.", None),
    ("Why do leaves change color in autumn?", None),
    ("What does DNA stand for?", "deoxyribonucleic"),
    ("Describe a sunset using three adjectives.", None),
    ("What is the symbol of the euro currency?", "€"),
    ("Who invented the telephone?", "Bell"),
    ("What is the longest river in Africa?", "Nile"),
    ("Give me a fun activity for a rainy afternoon.", None),
    ("What do you call a baby cat?", "kitten"),
    ("What is the first letter of the Greek alphabet?", "alpha"),
]
NO_TOOL_TRAIN = [
    "Write a limerick about a sleepy cat.", "What is the main job of the lungs?",
    "Who composed the Four Seasons?", "Suggest a title for a mystery novel.",
    "What does a botanist study?", "Explain the difference between weather and climate.",
    "Give me an idea for a birthday surprise.", "What do pandas mostly eat?",
    "Write a short thank-you note to a teacher.", "Which bird is a symbol of peace?",
    "What is the purpose of a comma?", "Suggest a fruit for a picnic.",
    "How can I become a better listener?", "Who sculpted The Thinker?",
    "What is an adjective?", "Describe the taste of lemon.",
    "Which desert is the biggest?", "Tell me a riddle.",
    "What is the function of roots in a plant?", "Give me a motivational quote.",
    "What sound does a cow make?", "Why do we need sleep?", "What is the opposite of 'brave'?",
    "What does the word 'gleaming' mean?", "Who wrote the Odyssey?",
    "What are the three states of matter?", "Suggest a healthy breakfast.", "What is a sonnet?",
    "How do magnets work?", "What is the color of an emerald?",
    "Invent a name for a new ice cream flavour.", "What do astronauts wear in space?",
    "Explain what a verb is.", "Give me two ideas for a science fair project.",
    "Who was Cleopatra?", "What animal is known for changing its colour?",
    "Write a tweet about a sunny morning.", "What is the purpose of a seatbelt?",
    "Which instrument has six strings?", "What makes a good friend?",
    "What do you call a group of wolves?", "Describe winter in one sentence.",
    "Why is exercise good for you?", "What is a volcano?", "Name a famous bridge.",
    "How do I write a polite email?", "What does a librarian do?",
    "Tell me a fun fact about elephants.", "What is the meaning of the word 'serene'?",
    "Suggest a game to play with friends outdoors.",
    "Write a short poem about autumn leaves.", "How do birds know where to migrate?", "Give me a tip for learning a new language.",
    "What does a carpenter build?", "Describe the sound of a thunderstorm.",
    "What is photosynthesis?",
    "Suggest a name for a coffee shop.", "Who wrote Don Quixote?",
    "What is the difference between a lake and a sea?", "How can I make my handwriting neater?",
    "What does a compass show?", "Write a short apology for being late.",
    "What is a haiku?", "Why do cats purr?", "Name a vegetable that grows underground.",
    "What does an architect do?", "Tell me something interesting about the Moon.",
    "How do I start a vegetable garden?", "Which sport uses a shuttlecock?", "What is an antonym of 'happy'?",
    "Explain what gravity is in simple words.", "Write a slogan for a bicycle shop.", "Who was Marie Curie?",
    "What do you call a young dog?", "Why should we recycle?",
    "What is the role of a referee?", "Describe a forest in the morning.",
    "Which fruit is known for keeping the doctor away?", "What is a metaphor?",
    "Give me an idea for a weekend hobby.", "What is the job of the heart's valves?",
    "How do rainbows form?",
    "Suggest a theme for a costume party.",
]


def test_items(rng, taken: set, countries: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    out["CALC"] = [item(f"calc-{i:03d}", prompt, [{"name": "CALC",
                                                   "arguments": {"expression": forms}}],
                        [number_check(float(value) if "." in value else int(value))], kind)
                   for i, (prompt, forms, value, kind) in
                   enumerate(calc_items(rng, COUNTS["CALC"], TEST_CALC, taken), 1)]
    out["CONVERT"] = []
    for i, (prompt, value, source, target, result) in enumerate(
            convert_items(rng, COUNTS["CONVERT"], TEST_PAIRS, TEST_CONVERT), 1):
        shown = float(result.split(" = ")[1].split()[0])
        out["CONVERT"].append(item(
            f"convert-{i:03d}", prompt,
            [{"name": "CONVERT", "arguments": {"value": [value], "from_unit": [source],
                                               "to_unit": [target]}}],
            [number_check(int(shown) if shown.is_integer() else shown)],
            f"{units.FACTORS[source][0]}", result=result))
    out["DAYS_BETWEEN"] = []
    for i in range(1, COUNTS["DAYS_BETWEEN"] + 1):
        first, second = two_days(rng)
        (a, b), kind = written((first, second), rng)
        result = dates.days_between(first.isoformat(), second.isoformat())
        out["DAYS_BETWEEN"].append(item(
            f"days-{i:03d}", rng.choice(TEST_DAYS).format(a=a, b=b),
            [{"name": "DAYS_BETWEEN", "arguments": {"start": [first.isoformat()],
                                                    "end": [second.isoformat()]}}],
            [number_check(int(result.split()[0]))], kind, result=result))
    out["WEEKDAY"] = []
    for i in range(1, COUNTS["WEEKDAY"] + 1):
        day = random_day(rng, 1950, 2040)
        (text,), kind = written((day,), rng)
        result = dates.weekday(day.isoformat())
        out["WEEKDAY"].append(item(
            f"weekday-{i:03d}", rng.choice(TEST_WEEKDAY).format(d=text),
            [{"name": "WEEKDAY", "arguments": {"date": [day.isoformat()]}}],
            [{"type": "contains", "value": result}], kind, result=result))
    out["LOOKUP"] = []
    for i, (prompt, country, field) in enumerate(
            lookup_items(rng, COUNTS["LOOKUP"], countries, TEST_LOOKUP), 1):
        row = lookup.table()[country]
        names = [country] + row.get("aliases", [])
        arguments = {"country": names, "field": [field, ""] if field == "capital" else [field]}
        out["LOOKUP"].append(item(
            f"lookup-{i:03d}", prompt, [{"name": "LOOKUP", "arguments": arguments}],
            [FIELD_CHECK[field](row)], field, result=lookup.lookup(country, field)))
    return out


def no_tool_items() -> list[dict]:
    out = []
    for i, (prompt, answer) in enumerate(NO_TOOL_TEST, 1):
        found = [] if answer is None else [number_check(answer)] if isinstance(answer, int) \
            else [{"type": "contains", "value": answer}]
        out.append(item(f"none-{i:03d}", prompt, [], found, "no_tool"))
    return out


def train_contexts(rng, taken: set, countries: list[str], avoid: list[str]) -> list[dict]:
    """User messages to bake on; ``avoid``: the test items' and the task suite's prompts."""
    found = []
    for prompt, *_ in calc_items(rng, TRAIN_COUNTS["CALC"], TRAIN_CALC, taken):
        found.append({"user": prompt, "tool": "CALC"})
    for prompt, *_ in convert_items(rng, TRAIN_COUNTS["CONVERT"], TRAIN_PAIRS, TRAIN_CONVERT):
        found.append({"user": prompt, "tool": "CONVERT"})
    days = 0
    while days < TRAIN_COUNTS["DAYS_BETWEEN"]:
        (a, b), _ = written(two_days(rng), rng)
        prompt = rng.choice(TRAIN_DAYS).format(a=a, b=b)
        if not near_duplicates([prompt], avoid):  # month names can make two dates look alike
            found.append({"user": prompt, "tool": "DAYS_BETWEEN"})
            days += 1
    for _ in range(TRAIN_COUNTS["WEEKDAY"]):
        (text,), _ = written((random_day(rng),), rng)
        found.append({"user": rng.choice(TRAIN_WEEKDAY).format(d=text), "tool": "WEEKDAY"})
    for prompt, *_ in lookup_items(rng, TRAIN_COUNTS["LOOKUP"], countries, TRAIN_LOOKUP):
        found.append({"user": prompt, "tool": "LOOKUP"})
    found += [{"user": prompt, "tool": None} for prompt in NO_TOOL_TRAIN]
    # a random sum or wording can land on a test item or a task of the suite: drop those
    found = [c for c in found if not near_duplicates([c["user"]], avoid)]
    found = list({c["user"].lower(): c for c in found}.values())  # a wording drawn twice
    rng.shuffle(found)
    return found


def build() -> dict[str, str]:
    """{file name relative to this folder: its text}; refuses data that shares near duplicates
    across the parts that must share nothing."""
    test_countries, train_countries = country_rows(random.Random(0))
    taken: set = set()  # sums asked by a test item are never asked by a training context
    specs = build_specs()
    tests = test_items(random.Random(1), taken, test_countries)
    no_tool = no_tool_items()
    prompts = [i["prompt"] for group in tests.values() for i in group] + \
        [i["prompt"] for i in no_tool]
    task_items = [i["prompt"] for task in TASKS.values() for i in task.items]
    train = train_contexts(random.Random(2), taken, train_countries, prompts + task_items)

    train_text = [c["user"] for c in train]
    demonstrations = [e.user for s in specs for e in s.examples]
    for name, pairs in (("training contexts vs test items", near_duplicates(train_text, prompts)),
                        ("demonstrations vs test items", near_duplicates(demonstrations, prompts)),
                        ("training contexts vs the task suite",
                         near_duplicates(train_text, task_items))):
        if pairs:
            raise ValueError(f"{name} share {len(pairs)} near duplicates, e.g. {pairs[:8]}")
    if len(set(map(str.lower, train_text))) != len(train_text):
        raise ValueError("training contexts repeat a message")
    out = {f"tests/{name}.jsonl": _jsonl(items) for name, items in tests.items()}
    out["no_tool.jsonl"] = _jsonl(no_tool)
    out["train.jsonl"] = _jsonl(train)
    data = {"tools": [{**s.to_dict(), "tests": f"tests/{s.name}.jsonl"} for s in specs]}
    out["tools.json"] = _readable(data)
    return out


def main() -> None:
    found = build()
    (HERE / "tests").mkdir(exist_ok=True)
    for name, text in found.items():
        files.write_text(HERE / name, text)
    specs = specs_from(json.loads(found["tools.json"]), "tools.json", HERE)
    print(f"wrote {len(specs)} tools, {sum(len(s.tests) for s in specs)} tool items, "
          f"{found['no_tool.jsonl'].count(chr(10))} no-tool items, "
          f"{found['train.jsonl'].count(chr(10))} training contexts")


def _readable(data) -> str:
    """Indented JSON with every list of plain values on one line."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]",
                  lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    main()

"""Generated fine-tuning tasks with exact-match scoring, made from a seed (no data set downloads).

Each task turns a random generator into (question, answer) pairs. Every question is assigned to train or
eval by a hash of its text, so the eval set is held out by construction, even for a task whose question
space is small enough for the train set to cover it (french_numbers has 1000 questions).
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from typing import Callable

_FIRST_NAMES = ["Maria", "Jonas", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tomasz", "Nadia", "Felix", "Amara", "Hugo"]
_CITIES = ["Lyon", "Osaka", "Lagos", "Quito", "Porto", "Tromso", "Hanoi", "Cusco", "Gdansk", "Perth", "Tunis", "Leeds"]
_JOBS = ["baker", "pilot", "nurse", "chemist", "carpenter", "teacher", "farmer", "architect"]
_UNITS = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze",
          "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit", "dix-neuf"]
_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_PRODUCTS = ["apples", "rice bags", "candles", "batteries", "notebooks", "towels", "lemons", "nails", "lamps",
             "mugs"]
_COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def french_number(n: int) -> str:
    """0..999 in French words, with the 1990 hyphen-everywhere spelling (deterministic, one right answer)."""
    if n < 20:
        return _UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        if tens in (7, 9):  # soixante-dix, quatre-vingt-dix: the unit counts from 10
            base = "soixante" if tens == 7 else "quatre-vingt"
            return f"{base}-et-onze" if n == 71 else f"{base}-{_UNITS[10 + unit]}"
        if tens == 8:
            return "quatre-vingts" if unit == 0 else f"quatre-vingt-{_UNITS[unit]}"
        if unit == 0:
            return _TENS[tens]
        return f"{_TENS[tens]}-et-un" if unit == 1 else f"{_TENS[tens]}-{_UNITS[unit]}"
    hundreds, rest = divmod(n, 100)
    head = "cent" if hundreds == 1 else f"{_UNITS[hundreds]}-cents" if rest == 0 else f"{_UNITS[hundreds]}-cent"
    return head if rest == 0 else f"{head}-{french_number(rest)}"


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    if rng.random() < 0.5:
        return f"Compute {a} + {b}. Reply with the number only.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}. Reply with the number only.", str(a - b)


def _json_extract(rng: random.Random) -> tuple[str, str]:
    name, city, job = rng.choice(_FIRST_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
    age = rng.randint(19, 88)
    article = "an" if job[0] in "aeiou" else "a"
    templates = [
        f"{name} is a {age}-year-old {job} from {city}.",
        f"Meet {name}, {age}, who works as {article} {job} in {city}.",
        f"In {city} lives {name}, {article} {job} aged {age}.",
    ]
    answer = json.dumps({"name": name, "age": age, "job": job, "city": city})
    return f"Extract name, age, job and city as JSON: {rng.choice(templates)}", answer


def _json_order(rng: random.Random) -> tuple[str, str]:
    """A harder extraction than _json_extract: every field needs normalising, and the total needs a sum.

    Dates come in three spellings and leave as ISO dates; quantities come as digits or words and leave as
    numbers; the item list keeps the order of mention. json_extract only copies words, which every
    compression method keeps (quality.md), so this task is the one that tells the methods apart on JSON.
    """
    name, city = rng.choice(_FIRST_NAMES), rng.choice(_CITIES)
    year, month, day = rng.randint(2019, 2027), rng.randint(1, 12), rng.randint(1, 28)
    date_text = rng.choice([f"{_MONTHS[month - 1]} {day}, {year}", f"{day} {_MONTHS[month - 1]} {year}",
                            f"{day:02d}.{month:02d}.{year}"])
    products = rng.sample(_PRODUCTS, rng.randint(1, 3))
    quantities = [rng.randint(1, 12) for _ in products]
    mentions = [f"{_COUNT_WORDS[q] if rng.random() < 0.5 else q} {p}" for q, p in zip(quantities, products)]
    items_text = mentions[0] if len(mentions) == 1 else ", ".join(mentions[:-1]) + " and " + mentions[-1]
    templates = [
        f"On {date_text}, {name} from {city} ordered {items_text}.",
        f"{name} ({city}) placed an order for {items_text} on {date_text}.",
        f"Order dated {date_text}: {items_text}, for {name} in {city}.",
    ]
    answer = json.dumps({"customer": name, "city": city, "date": f"{year}-{month:02d}-{day:02d}",
                         "items": dict(zip(products, quantities)), "total": sum(quantities)})
    return f"Extract the order as JSON (customer, city, ISO date, items, total): {rng.choice(templates)}", answer


def _french(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return f"Write {n} in French words.", french_number(n)


@dataclass(frozen=True)
class Task:
    name: str
    make_item: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int

    def items(self, count: int, seed: int, held_out: bool) -> list[tuple[str, str]]:
        """`count` items of the eval side (held_out) or the train side; eval items are distinct."""
        rng = random.Random(f"{self.name}:{seed}:{held_out}")
        items: list[tuple[str, str]] = []
        seen: set[str] = set()
        for _ in range(200 * count):
            if len(items) == count:
                break
            question, answer = self.make_item(rng)
            if is_eval_question(question) != held_out or (held_out and question in seen):
                continue
            seen.add(question)
            items.append((question, answer))
        return items

    def split(self, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        return self.items(n_train, seed, held_out=False), self.items(n_eval, seed, held_out=True)


def is_eval_question(question: str) -> bool:
    """One question in five belongs to the eval side, whatever the seed."""
    return zlib.crc32(question.encode()) % 5 == 0


TASKS = {
    task.name: task
    for task in (
        Task("arithmetic", _arithmetic, max_new_tokens=8),
        Task("json_extract", _json_extract, max_new_tokens=40),
        Task("json_order", _json_order, max_new_tokens=80),
        Task("french_numbers", _french, max_new_tokens=16),
    )
}


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()

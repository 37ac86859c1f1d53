"""bench/tasks.py's generated tasks and bench/quality.py's merging of runs (CPU; the fine-tunes need a GPU)."""
import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402
from tasks import TASKS, french_number, is_eval_question  # noqa: E402


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_items_are_held_out_and_distinct(name):
    train, held_out = TASKS[name].split(400, 100, seed=3)
    assert len(train) == 400 and len(held_out) == 100
    assert len({q for q, _ in held_out}) == 100
    assert not {q for q, _ in train} & {q for q, _ in held_out}
    assert all(is_eval_question(q) for q, _ in held_out) and not any(is_eval_question(q) for q, _ in train)
    assert TASKS[name].split(50, 20, seed=3) == (train[:50], held_out[:20])  # same seed, same items


def test_french_numbers_spelling():
    expected = {0: "zéro", 17: "dix-sept", 21: "vingt-et-un", 71: "soixante-et-onze", 80: "quatre-vingts",
                91: "quatre-vingt-onze", 100: "cent", 200: "deux-cents", 201: "deux-cent-un", 999: "neuf-cent-quatre-vingt-dix-neuf"}
    assert {n: french_number(n) for n in expected} == expected


_WORDS = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                      "ten", "eleven", "twelve"])}
_MONTHS = {m: i + 1 for i, m in enumerate(["January", "February", "March", "April", "May", "June", "July", "August",
                                          "September", "October", "November", "December"])}


def test_json_order_answer_follows_from_the_question():
    """Re-derive every field of the answer from the question text by an independent parse."""
    rng = random.Random(7)
    for _ in range(300):
        question, answer = TASKS["json_order"].make_item(rng)
        order = json.loads(answer)
        assert list(order) == ["customer", "city", "date", "items", "total"]
        text = question.split(": ", 1)[1]
        assert order["customer"] in text and order["city"] in text
        year, month, day = map(int, order["date"].split("-"))
        assert (f"{day:02d}.{month:02d}.{year}" in text or f"{day} {list(_MONTHS)[month - 1]} {year}" in text
                or f"{list(_MONTHS)[month - 1]} {day}, {year}" in text)
        mentioned = re.findall(r"\b(\d+|" + "|".join(_WORDS) + r") (" + "|".join(map(re.escape, order["items"])) + ")", text)
        assert {p: int(q) if q.isdigit() else _WORDS[q] for q, p in mentioned} == order["items"]
        assert [p for _, p in mentioned] == list(order["items"])  # order of mention kept
        assert order["total"] == sum(order["items"].values())


def _result(task: str, acc: float, stamp: dict | None) -> dict:
    methods = {label: {"accuracy": acc, "gain_kept": acc, "file_bytes": 10} for label, *_ in quality.METHODS}
    row = {"task": task, "base": 0.0, "finetuned": 1.0, "methods": methods}
    return row | ({"run": stamp} if stamp else {})


def test_a_run_of_some_tasks_replaces_their_rows_and_keeps_the_rest():
    earlier = [_result("arithmetic", 0.5, None), _result("json_extract", 1.0, None)]
    stamp = {"date": "2026-12-07", "device": "H100", "commit": "abc1234"}
    merged = quality.merged_results(earlier, _result("json_order", 0.8, stamp))
    merged = quality.merged_results(merged, _result("arithmetic", 0.6, stamp))
    assert [r["task"] for r in merged] == ["arithmetic", "json_extract", "json_order"]  # TASKS order
    assert merged[0]["methods"]["svd@1/16"]["accuracy"] == 0.6
    text = quality.markdown(merged, "H100")
    assert "| json_order | 0.0 | 100.0 | 80.0 (80%)" in text
    assert "Measured in: arithmetic, json_order: 2026-12-07 on H100 (commit: abc1234); json_extract: an earlier run" in text

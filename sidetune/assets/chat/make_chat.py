"""Writes train.jsonl and eval.jsonl in this directory: short synthetic conversations from templates (see README.md).

    python sidetune/assets/chat/make_chat.py

Deterministic (seeded); every answer is computed by this script, so the data is correct by construction.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna"}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "early": "late", "light": "dark",
             "open": "closed", "happy": "sad", "full": "empty", "high": "low", "wet": "dry", "old": "new"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["apple", "river", "garden", "planet", "window", "yellow", "silver", "banana", "castle", "pencil", "rocket",
         "forest", "butter", "candle", "dragon", "guitar", "marble", "orange", "pepper", "tunnel"]
GREETINGS = [("Hi!", "Hello! How can I help you today?"), ("Hello there.", "Hi! What can I do for you?"),
             ("Good morning!", "Good morning! What would you like to talk about?"),
             ("Thanks, that was helpful.", "You're welcome! Let me know if you need anything else."),
             ("Bye!", "Goodbye! Have a great day.")]
SYSTEMS = {
    "plain": None,
    "brief": "Answer with as few words as possible.",
    "upper": "You always answer in uppercase letters.",
    "polite": "You are a polite assistant. End every answer with: Hope that helps!",
}


def styled(answer: str, short: str, style: str) -> str:
    if style == "brief":
        return short
    if style == "upper":
        return answer.upper()
    if style == "polite":
        return f"{answer} Hope that helps!"
    return answer


def arithmetic(rng: random.Random, style: str) -> list[tuple[str, str]]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    s = a + b
    turns = [(rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}."]),
              styled(f"{a} plus {b} is {s}.", str(s), style))]
    if rng.random() < 0.6:
        c = rng.randint(2, 5)
        turns.append((f"And if you multiply that by {c}?", styled(f"{s} times {c} is {s * c}.", str(s * c), style)))
    if rng.random() < 0.3:
        d = rng.randint(1, 9)
        last = s * c if len(turns) > 1 else s
        turns.append((f"Now subtract {d}.", styled(f"{last} minus {d} is {last - d}.", str(last - d), style)))
    return turns


def capital(rng: random.Random, style: str) -> list[tuple[str, str]]:
    country, city = rng.choice(list(CAPITALS.items()))
    turns = [(rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
              styled(f"The capital of {country} is {city}.", city, style))]
    if rng.random() < 0.5:
        other, other_city = rng.choice([kv for kv in CAPITALS.items() if kv[0] != country])
        turns.append((f"And {other}?", styled(f"The capital of {other} is {other_city}.", other_city, style)))
    return turns


def opposite(rng: random.Random, style: str) -> list[tuple[str, str]]:
    word, opp = rng.choice(list(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, opp = opp, word
    return [(rng.choice([f"What is the opposite of '{word}'?", f"Give me the opposite of {word}."]),
             styled(f"The opposite of '{word}' is '{opp}'.", opp, style))]


def spelling(rng: random.Random, style: str) -> list[tuple[str, str]]:
    word = rng.choice(WORDS)
    turns = [(f"Spell '{word}' backwards.", styled(f"'{word}' backwards is '{word[::-1]}'.", word[::-1], style))]
    if rng.random() < 0.5:
        turns.append(("How many letters does it have?",
                      styled(f"'{word}' has {len(word)} letters.", str(len(word)), style)))
    return turns


def weekday(rng: random.Random, style: str) -> list[tuple[str, str]]:
    i, n = rng.randrange(7), rng.randint(1, 10)
    day, later = DAYS[i], DAYS[(i + n) % 7]
    return [(f"If today is {day}, what day is it in {n} day{'s' if n > 1 else ''}?",
             styled(f"In {n} day{'s' if n > 1 else ''} it will be {later}.", later, style))]


def small_talk(rng: random.Random, style: str) -> list[tuple[str, str]]:
    return [(q, styled(a, a.split("!")[0] + "!" if "!" in a else a, style))
            for q, a in rng.sample(GREETINGS[:3], 1)]


TOPICS = [arithmetic, capital, opposite, spelling, weekday]


def conversation(rng: random.Random) -> dict:
    style = rng.choice(list(SYSTEMS))
    turns = []
    if rng.random() < 0.2:
        turns += small_talk(rng, style)
    for topic in rng.sample(TOPICS, rng.choice([1, 1, 2])):
        turns += topic(rng, style)
    if rng.random() < 0.15:
        turns.append((GREETINGS[3][0], styled(GREETINGS[3][1], "You're welcome!", style)))
    messages = [{"role": "system", "content": SYSTEMS[style]}] if SYSTEMS[style] else []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(12)
    for name, n in (("train.jsonl", 400), ("eval.jsonl", 64)):
        with open(here / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps(conversation(rng)) + "\n")


if __name__ == "__main__":
    main()

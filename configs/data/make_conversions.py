"""Generate the shipped alpaca-style unit-conversion dataset used by the benchmark (deterministic).

    python configs/data/make_conversions.py

Each row is `{"instruction", "input", "output"}` (axolotl's `type: alpaca`). The task converts a list
of k quantities (k = 1..7) and explains every conversion on its own line, then sums a subtotal, so
the tokenised rows span roughly 120 to 480 tokens with the SmolLM2 tokenizer (alpaca preamble
included). A quarter of the rows are word problems with no `input`. The varied lengths are what
makes packing matter: padded batches waste most of their slots on the short rows.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent

# (from unit, its singular, to unit, factor, quantity name): value_in_to = value_in_from * factor
CONVERSIONS = [
    ("miles", "mile", "kilometres", 1.609344, "distance"),
    ("kilometres", "kilometre", "miles", 0.621371, "distance"),
    ("feet", "foot", "metres", 0.3048, "length"),
    ("inches", "inch", "centimetres", 2.54, "length"),
    ("pounds", "pound", "kilograms", 0.45359237, "mass"),
    ("ounces", "ounce", "grams", 28.349523, "mass"),
    ("US gallons", "US gallon", "litres", 3.785411784, "volume"),
    ("litres", "litre", "US gallons", 0.264172, "volume"),
    ("square feet", "square foot", "square metres", 0.09290304, "area"),
    ("acres", "acre", "hectares", 0.404686, "area"),
    ("miles per hour", "mile per hour", "metres per second", 0.44704, "speed"),
    ("kilowatt-hours", "kilowatt-hour", "megajoules", 3.6, "energy"),
]
ITEMS = ["a bicycle route", "a parcel", "a water tank", "a garden plot", "a hiking trail", "a suitcase",
         "a swimming pool", "a wooden plank", "a bag of flour", "a fuel can", "a field", "a train",
         "a battery", "a bookshelf", "a river crossing", "a rooftop", "a bucket", "a cable"]


def number(rand: random.Random) -> float:
    return round(rand.uniform(0.5, 500.0), rand.choice([0, 1, 2]))


def fmt(x: float) -> str:
    return f"{x:,.3f}".rstrip("0").rstrip(".")


def list_row(rand: random.Random) -> dict:
    k = rand.randint(1, 7)
    src, one, dst, factor, kind = rand.choice(CONVERSIONS)
    items = rand.sample(ITEMS, k)
    values = [number(rand) for _ in items]
    lines = [f"- {item}: {fmt(v)} {src}" for item, v in zip(items, values)]
    steps, total = [], 0.0
    for i, (item, v) in enumerate(zip(items, values), start=1):
        converted = v * factor
        total += converted
        steps.append(f"{i}. {item.capitalize()}: {fmt(v)} {src} x {factor} = {fmt(converted)} {dst}.")
    output = (f"One {one} is {factor} {dst}, so each {kind} is multiplied by "
              f"{factor}.\n" + "\n".join(steps))
    if k > 1:
        output += f"\nTogether the {k} quantities come to {fmt(total)} {dst}."
    return {"instruction": f"Convert every {kind} below from {src} to {dst}, showing the working.",
            "input": "\n".join(lines), "output": output}


def word_problem_row(rand: random.Random) -> dict:
    src, _, dst, factor, kind = rand.choice(CONVERSIONS)
    item = rand.choice(ITEMS)
    v, w = number(rand), number(rand)
    a, b = v * factor, w * factor
    instruction = (f"{item.capitalize()} measures {fmt(v)} {src}, and a second one measures {fmt(w)} {src}. "
                   f"What is the difference between them in {dst}?")
    output = (f"First convert both: {fmt(v)} {src} x {factor} = {fmt(a)} {dst}, and {fmt(w)} {src} x {factor} = "
              f"{fmt(b)} {dst}. The difference is |{fmt(a)} - {fmt(b)}| = {fmt(abs(a - b))} {dst}.")
    return {"instruction": instruction, "input": "", "output": output}


def main(size=400, seed=0, name="conversions_alpaca.jsonl"):
    rand = random.Random(seed)
    with open(HERE / name, "w") as f:
        for _ in range(size):
            row = word_problem_row(rand) if rand.random() < 0.25 else list_row(rand)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Generate the shipped preference datasets from the arithmetic questions (deterministic).

    python configs/data/make_preference.py

For every question of `arithmetic_train.jsonl` / `arithmetic_eval.jsonl` (so held-out pairs ask
questions never seen in training), the preferred answer is the correct one ("47 + 38 = 85") and the
dispreferred one makes a typical mistake: a dropped or extra carry (off by 10), an off-by-one, a
wrong units digit, or the other operation. Files:

- `preference_{train,eval}.jsonl`: {"prompt", "chosen", "rejected"} -- DPO (`chatml.prompt_pairs`),
  ORPO (`chat_template.argilla`) and reward models (`bradley_terry.chat_template`);
- `kto_{train,eval}.jsonl`: {"prompt", "completion", "label"} -- each question once, its answer
  correct (label true) or mistaken (label false), about half each.
"""
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def mistake(a: int, op: str, b: int, rand: random.Random) -> int:
    right = a + b if op == "+" else a - b
    kind = rand.choice(("carry", "one", "units", "operation"))
    if kind == "carry":
        wrong = right + rand.choice((-10, 10))
    elif kind == "one":
        wrong = right + rand.choice((-1, 1))
    elif kind == "units":
        wrong = right - right % 10 + (right % 10 + rand.randint(2, 8)) % 10
    else:
        wrong = a - b if op == "+" else a + b
    return wrong if wrong != right and wrong >= 0 else right + 10


def questions(name: str):
    for line in (HERE / name).read_text().splitlines():
        question = json.loads(line)["messages"][0]["content"]
        a, op, b = QUESTION.fullmatch(question).groups()
        yield question, int(a), op, int(b)


def main(seed: int = 0):
    rand = random.Random(seed)
    for split in ("train", "eval"):
        pairs, singles = [], []
        for question, a, op, b in questions(f"arithmetic_{split}.jsonl"):
            right = a + b if op == "+" else a - b
            chosen = f"{a} {op} {b} = {right}"
            rejected = f"{a} {op} {b} = {mistake(a, op, b, rand)}"
            pairs.append({"prompt": question, "chosen": chosen, "rejected": rejected})
            good = rand.random() < 0.5
            singles.append({"prompt": question, "completion": chosen if good else rejected, "label": good})
        for name, rows in ((f"preference_{split}.jsonl", pairs), (f"kto_{split}.jsonl", singles)):
            with open(HERE / name, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

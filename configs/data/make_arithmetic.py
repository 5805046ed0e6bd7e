"""Generate the shipped arithmetic chat dataset (deterministic: same files on every machine).

    python configs/data/make_arithmetic.py

Each row is a chat: the user asks for a sum or difference of two-digit numbers, the assistant
answers in one fixed form ("47 + 38 = 85"). Held-out rows use operand pairs never seen in training.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def rows(pairs):
    for a, op, b in pairs:
        answer = a + b if op == "+" else a - b
        yield {"messages": [
            {"role": "user", "content": f"What is {a} {op} {b}?"},
            {"role": "assistant", "content": f"{a} {op} {b} = {answer}"},
        ]}


def main(train_size=400, eval_size=100, seed=0):
    rand = random.Random(seed)
    pairs = set()
    while len(pairs) < train_size + eval_size:
        a, b = rand.randint(10, 99), rand.randint(10, 99)
        op = rand.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        pairs.add((a, op, b))
    pairs = sorted(pairs)
    rand.shuffle(pairs)
    for name, part in (("arithmetic_train.jsonl", pairs[:train_size]), ("arithmetic_eval.jsonl", pairs[train_size:])):
        with open(HERE / name, "w") as f:
            for row in rows(part):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

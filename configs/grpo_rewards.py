"""Reward functions and the prompt transform of configs/grpo-smollm2.yaml (TRL's signatures).

The arithmetic chats of configs/data become questions: the transform keeps the user turn as the
prompt (after a system instruction) and the assistant's result as the `answer` column, which reaches
the reward functions as a keyword. `correctness` pays for the right number, `answer_format` for
replying the way the system prompt asks.
"""
import re

SYSTEM = "Answer with the result only, in the form: The answer is N."
_NUMBER = re.compile(r"-?\d+")
_FORMAT = re.compile(r"\s*The answer is (-?\d+)\.?\s*")


def arithmetic_prompts(cfg, *args, **kwargs):
    """`type: configs.grpo_rewards.arithmetic_prompts`: a chat row -> a prompt and its answer."""

    def map_fn(example, tokenizer=None):
        question, reply = example["messages"][0]["content"], example["messages"][1]["content"]
        return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                "answer": reply.rsplit("=", 1)[1].strip()}

    return map_fn, {"remove_columns": ["messages"]}


def correctness(completions, answer, **kwargs):
    """1 when the last number of the reply is the answer, else 0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = _NUMBER.findall(completion[0]["content"])
        rewards.append(1.0 if numbers and numbers[-1] == str(expected) else 0.0)
    return rewards


def answer_format(completions, **kwargs):
    """1 for exactly "The answer is N.", 0.5 for a reply that contains it among other words, else 0."""
    rewards = []
    for completion in completions:
        text = completion[0]["content"]
        rewards.append(1.0 if _FORMAT.fullmatch(text) else 0.5 if "The answer is" in text else 0.0)
    return rewards

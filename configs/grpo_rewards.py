"""Reward functions and the prompt transform of configs/grpo-smollm2.yaml (TRL's signatures).

The arithmetic chats of configs/data become questions: the transform keeps the user turn, asks for
the number only, and moves the assistant's result into an `answer` column, which reaches the reward
functions as a keyword. `correctness` pays for the right number, `number_only` for replying the
way the question asks (SmolLM2-135M-Instruct mostly answers with a sentence, or an essay).
"""
import re

INSTRUCTION = " Answer with the number only."
_NUMBER = re.compile(r"-?\d+")
_ONLY_A_NUMBER = re.compile(r"\s*-?\d+\.?\s*")


def arithmetic_prompts(cfg, *args, **kwargs):
    """`type: configs.grpo_rewards.arithmetic_prompts`: a chat row -> a question and its answer."""

    def map_fn(example, tokenizer=None):
        question, reply = example["messages"][0]["content"], example["messages"][1]["content"]
        return {"prompt": [{"role": "user", "content": question + INSTRUCTION}],
                "answer": reply.rsplit("=", 1)[1].strip()}

    return map_fn, {"remove_columns": ["messages"]}


def correctness(completions, answer, **kwargs):
    """1 when the last number of the reply is the answer, else 0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = _NUMBER.findall(completion[0]["content"])
        rewards.append(1.0 if numbers and numbers[-1] == str(expected) else 0.0)
    return rewards


def number_only(completions, **kwargs):
    """1 when the reply is a number and nothing else, else 0."""
    return [1.0 if _ONLY_A_NUMBER.fullmatch(c[0]["content"]) else 0.0 for c in completions]

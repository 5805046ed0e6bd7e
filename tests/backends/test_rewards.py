"""GRPO reward functions: user functions imported from the working directory get TRL's arguments and
the dataset columns, return one number (or None) per completion, and every way of getting that wrong
is a one-line error naming the function and row; a reward-model folder scores prompt + completion
text as our forward + score head does; a pool of workers gives the same scores as one process."""
import math
import os
import sys

import pytest
import torch

from backends.rewards import (
    RewardError,
    RewardFunction,
    RewardPool,
    load_reward_functions,
    load_rollout_function,
    score_completions,
    shape_completions,
)

REWARDS = '''
import math
import os

import numpy as np

CALLS = []


def exact(prompts, completions, answer, **kwargs):
    return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


def length(completions, **kwargs):
    return [len(c[0]["content"] if isinstance(c, list) else c) for c in completions]


def by_ids(completion_ids, **kwargs):
    return [None if not ids else len(ids) for ids in completion_ids]


def arguments(prompts, completions, completion_ids, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    return np.zeros(len(completions))


def picky(completions, **kwargs):
    out = []
    for c in completions:
        if c[0]["content"] == "bad":
            raise IndexError("list index out of range")
        out.append(0.5)
    return out


def batch_only(completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("cannot batch\\nsecond line")
    return [1.0]


def short(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def words(completions, **kwargs):
    return ["high" for _ in completions]


def nan(completions, **kwargs):
    return [math.nan for _ in completions]


def worker_pid(completions, **kwargs):
    return [os.getpid() for _ in completions]


def a_dict(completions, **kwargs):
    return {"reward": 1.0}


def rollout(model, processing_class, prompts, generation_config=None):
    return ["x" for _ in prompts]


NOT_CALLABLE = 3
'''


@pytest.fixture
def rewards_dir(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    (tmp_path / "broken_rewards.py").write_text("import not_an_installed_module\n")
    monkeypatch.chdir(tmp_path)
    for name in ("my_rewards", "broken_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


PROMPTS = [[{"role": "user", "content": "1+1?"}]] * 2 + [[{"role": "user", "content": "2+2?"}]] * 2
TEXTS = ["2", " 3", "4 ", "five"]
IDS = [[5, 6], [7], [], [8, 9, 10]]
ANSWERS = ["2", "2", "4", "4"]


def score(funcs, completions=None, **kw):
    completions = shape_completions(PROMPTS, TEXTS) if completions is None else completions
    return score_completions(funcs, prompts=PROMPTS, completions=completions, completion_ids=IDS,
                             columns={"answer": ANSWERS, "prompt": PROMPTS}, num_generations=2, **kw)


def test_completions_are_assistant_messages_for_chat_prompts_and_text_otherwise():
    assert shape_completions(PROMPTS[:1] + ["plain"], ["a", "b"]) == [[{"role": "assistant", "content": "a"}], "b"]


def test_functions_get_trl_arguments_and_the_columns_and_none_is_nan(rewards_dir):
    funcs = load_reward_functions(["my_rewards.exact", "my_rewards.length", "my_rewards.by_ids",
                                   "my_rewards.arguments"])
    assert [(f.name, f.kind, f.source) for f in funcs][:2] == [("exact", "function", "my_rewards.exact"),
                                                              ("length", "function", "my_rewards.length")]
    scores = score(funcs)
    assert scores.dtype == torch.float64 and scores.shape == (4, 4)
    # raw values, no reward_weights: the caller weights and normalises
    expected = torch.tensor([[1, 1, 2, 0], [0, 2, 1, 0], [1, 2, math.nan, 0], [0, 4, 3, 0]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, equal_nan=True, rtol=0, atol=0)
    call = sys.modules["my_rewards"].CALLS[-1]
    # TRL leaves `prompt` out of the columns: it arrives as `prompts`
    assert sorted(call) == ["answer", "completion_ids", "completions", "prompts"]
    assert call["answer"] == ANSWERS and call["completion_ids"] == IDS and call["prompts"] == PROMPTS
    assert call["completions"][3] == [{"role": "assistant", "content": "five"}]


@pytest.mark.parametrize("name, message", [
    ("my_rewards.picky", r"^reward function my_rewards.picky raised IndexError: list index out of range on row 3$"),
    ("my_rewards.batch_only", r"^reward function my_rewards.batch_only raised RuntimeError: cannot batch on the batch "
                              r"of rows 0..3 \(no row raises when called alone\)$"),
    ("my_rewards.short", r"^reward function my_rewards.short returned 3 values for 4 completions; expected 4"),
    ("my_rewards.words", r"^reward function my_rewards.words returned 'high' on row 0; expected a finite int"),
    ("my_rewards.nan", r"^reward function my_rewards.nan returned nan on row 0; expected a finite int, float or bool "
                       r"\(None to leave the row out\)$"),
    ("my_rewards.a_dict", r"^reward function my_rewards.a_dict returned a dict; expected a list of 4 numbers"),
])
def test_a_misbehaving_function_is_one_line_naming_it_and_the_row(rewards_dir, name, message):
    texts = ["2", "3", "4", "bad"] if name.endswith("picky") else TEXTS
    with pytest.raises(RewardError, match=message) as err:
        score(load_reward_functions([name]), completions=shape_completions(PROMPTS, texts))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, message", [
    ("nowhere.fn", r"reward function 'nowhere.fn': module 'nowhere' not found .*nor is it a reward-model folder\. "
                   r"Expected a dotted module.fn importable from the working directory, or a local folder"),
    ("plainname", r"reward function 'plainname' is not a dotted path module.fn; nor is it a reward-model folder"),
    ("./no/such/folder", r"reward function './no/such/folder' is neither an existing folder nor a Hub id in the "
                         r"local Hugging Face cache"),
    ("my_rewards.missing", r"reward function 'my_rewards.missing': module 'my_rewards' \(.*my_rewards.py\) has no "
                           r"attribute 'missing'$"),
    ("my_rewards.NOT_CALLABLE", r"reward function 'my_rewards.NOT_CALLABLE' is a int, not callable"),
    ("broken_rewards.fn", r"importing module 'broken_rewards' failed: it imports 'not_an_installed_module', "
                          r"which is not installed"),
])
def test_names_that_do_not_resolve_say_which_part_failed(rewards_dir, name, message):
    with pytest.raises(RewardError, match=message):
        load_reward_functions([name])


def test_rollout_function_loads_by_dotted_path(rewards_dir):
    assert load_rollout_function("my_rewards.rollout")(None, None, ["a", "b"]) == ["x", "x"]
    with pytest.raises(RewardError, match=r"rollout_func 'my_rewards.nope': module 'my_rewards' .* no attribute"):
        load_rollout_function("my_rewards.nope")


def test_rows_must_be_whole_groups(rewards_dir):
    with pytest.raises(ValueError, match="4 completions are not whole groups of num_generations=3"):
        score_completions(load_reward_functions(["my_rewards.length"]), prompts=PROMPTS,
                          completions=shape_completions(PROMPTS, TEXTS), completion_ids=IDS, columns={},
                          num_generations=3)


def test_two_workers_score_as_one_process_does(rewards_dir):
    funcs = load_reward_functions(["my_rewards.exact", "my_rewards.length", "my_rewards.by_ids", "my_rewards.picky"])
    prompts, texts, ids, answers = PROMPTS * 2, TEXTS * 2, IDS * 2, ANSWERS * 2  # 4 groups over 2 workers
    call = dict(prompts=prompts, completion_ids=ids, columns={"answer": answers}, num_generations=2)
    local = score_completions(funcs, completions=shape_completions(prompts, texts), **call)
    pooled_funcs = funcs + load_reward_functions(["my_rewards.worker_pid"])
    with RewardPool(pooled_funcs, num_workers=2) as pool:
        pooled = score_completions(pooled_funcs, completions=shape_completions(prompts, texts), pool=pool, **call)
        torch.testing.assert_close(pooled[:, :4], local, equal_nan=True, rtol=0, atol=0)  # the same Python floats
        assert os.getpid() not in pooled[:, 4].tolist()  # scored in the workers
        assert all(len(set(pooled[g:g + 2, 4].tolist())) == 1 for g in range(0, 8, 2))  # a group stays together
        bad = texts[:6] + ["bad", "4"]  # row 6 lies in the second shard: the row named is global
        with pytest.raises(RewardError, match=r"my_rewards.picky raised IndexError: .* on row 6$"):
            score_completions(pooled_funcs, completions=shape_completions(prompts, bad), pool=pool, **call)
        with pytest.raises(ValueError, match="the pool runs"):
            score_completions(funcs, completions=shape_completions(prompts, texts), pool=pool, **call)


# ---------------------------------------------------------------------------------------------
# A reward model folder


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from backends.export import save_reward_model
    from backends.hf import load_tokenizer
    from pure import rng
    from pure.models.heads import init_score_head
    from pure.models.llama import init
    from tests.tiny import TINY

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = TINY.replace(vocab_size=len(tokenizer), tie_word_embeddings=True)
    params = init(config, rng.key(0))
    head = init_score_head(config, 1, rng.key(1))
    head["score.weight"] = head["score.weight"] * 50  # scores of order 1, not 0.02
    folder = save_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", params, head, config, tokenizer, 1,
                               pad_token_id=tokenizer.pad_token_id)
    return folder, params, head, config, tokenizer


def direct_scores(texts, params, head, config, tokenizer):
    """Each text alone, unpadded: our forward, the head at its last non-pad token."""
    from pure.models.llama import forward

    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        last = max(i for i, t in enumerate(ids) if t != tokenizer.pad_token_id)
        hidden = forward(params, torch.tensor([ids]), config, compute_logits=False).hidden
        out.append(float(hidden[0, last] @ head["score.weight"][0]))
    return torch.tensor(out, dtype=torch.float64)


def test_reward_model_scores_the_chat_text_as_our_forward_and_head_do(reward_model, rewards_dir):
    folder, params, head, config, tokenizer = reward_model
    funcs = load_reward_functions([str(folder), "my_rewards.length"], batch_size=3)  # 4 rows: a padded batch of 3
    model = funcs[0]
    assert (model.name, model.kind) == ("tiny-rm", "model")
    completions = shape_completions(PROMPTS, TEXTS)
    texts = model.fn.texts(PROMPTS, completions)
    assert texts[3] == tokenizer.apply_chat_template(PROMPTS[3] + completions[3], tokenize=False)
    assert texts[3].endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\nfive<|im_end|>\n")
    scores = score(funcs)
    fp32 = 1e-5  # the same fp32 weights, padded batch vs one row at a time
    torch.testing.assert_close(scores[:, 0], direct_scores(texts, params, head, config, tokenizer), atol=fp32, rtol=0)
    assert scores[:, 0].std() > 0.01
    assert scores[:, 1].tolist() == [1, 2, 2, 4]


def test_reward_model_joins_plain_prompts_and_completions(reward_model):
    folder, params, head, config, tokenizer = reward_model
    (model,) = load_reward_functions([str(folder)])
    prompts, texts = ["Q: 1+1\nA:", "Q: 1+1\nA:"], [" 2", " three"]
    assert model.fn.texts(prompts, shape_completions(prompts, texts)) == ["Q: 1+1\nA: 2", "Q: 1+1\nA: three"]
    scores = score_completions([model], prompts=prompts, completions=texts, completion_ids=[[1], [2]], columns={},
                               num_generations=2)
    fp32 = 1e-5  # as above
    torch.testing.assert_close(scores[:, 0], direct_scores(["Q: 1+1\nA: 2", "Q: 1+1\nA: three"], params, head,
                                                           config, tokenizer), atol=fp32, rtol=0)


def test_a_causal_lm_folder_is_not_a_reward_model(tmp_path):
    from backends.hf import save_pretrained
    from pure import rng
    from pure.models.llama import init
    from tests.tiny import TINY

    folder = save_pretrained(init(TINY, rng.key(0)), TINY, None, tmp_path / "lm")
    with pytest.raises(RewardError, match=r"config.json names \['LlamaForCausalLM'\]; a reward model must be a "
                                          r"\.\.\.ForSequenceClassification"):
        load_reward_functions([str(folder)])


def test_reward_function_kind_is_checked_and_a_pool_needs_dotted_paths():
    with pytest.raises(ValueError, match="kind must be one of"):
        RewardFunction("f", len, "judge")
    with pytest.raises(ValueError, match=r"reward functions \['len'\] have no dotted path"):
        RewardPool([RewardFunction("len", len, "function")], 2)

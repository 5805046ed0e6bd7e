"""The hf-packed rows are our packed micro-batches, and transformers gives our loss on them."""
import torch

from programs import common
from programs.bench.baselines import hf_model_of_config
from programs.bench.batches import collate_packed_rows, hf_packed_rows, load_train_examples, plan_micro_batches


def test_hf_packed_rows_are_our_packed_batches_and_give_our_loss(bench_config, tiny_model):
    """transformers honours packed position_ids with sdpa: the same packed batch, the same loss."""
    from pure.losses import sft
    from pure.train import make_apply

    params, model_config, tokenizer = common.load_model(bench_config)
    examples = load_train_examples(bench_config, tokenizer)
    batches = plan_micro_batches(examples, bench_config, common.pad_id(tokenizer), 2)
    assert all(b["input_ids"].shape == (2, 512) for b in batches)
    rows = hf_packed_rows(batches, common.pad_id(tokenizer))
    hf_batch = collate_packed_rows(rows[:2])
    ours = batches[0]
    assert torch.equal(hf_batch["input_ids"], ours["input_ids"])
    assert torch.equal(hf_batch["labels"], ours["labels"])
    assert torch.equal(hf_batch["position_ids"], ours["positions"])
    assert hf_batch["bench_counts"]["tokens"] == ours["num_tokens"]
    assert hf_batch["bench_counts"]["supervised"] == ours["num_trained"]

    model = hf_model_of_config(bench_config, tokenizer, torch.device("cpu"))  # LoRA B = 0: the base model
    with torch.no_grad():
        theirs = model(input_ids=hf_batch["input_ids"], labels=hf_batch["labels"],
                       position_ids=hf_batch["position_ids"]).loss
        mine, _ = sft.on_batch(make_apply(model_config, params)({}), common.tensors_only(ours))
        # Without segment-aware attention (one causal row) the loss must differ: the check can fail.
        one_row = {"input_ids": ours["input_ids"], "labels": ours["labels"], "positions": ours["positions"]}
        unpacked, _ = sft.on_batch(make_apply(model_config, params)({}), one_row)
    assert abs(theirs.item() - mine.item()) <= 1e-5  # fp32, same math, different kernels' op order
    assert abs(unpacked.item() - mine.item()) > 1e-4

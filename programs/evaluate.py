"""`python -m programs.evaluate --config x.yaml [--lora_model_dir DIR]`: loss and perplexity of the
model (with the run's adapter when there is one) on the eval and train splits, printed as JSON."""
from __future__ import annotations

import json
import math
import sys


def main(argv=None) -> int:
    from backends.datasets import prepare_datasets
    from backends.export import AdapterError
    from backends.hf import ModelLoadError
    from programs import common
    from programs.config import ConfigError, parse_cli
    from programs.data import data_spec
    from pure.data.settings import DataError
    from pure.losses import sft
    from pure.train import make_eval_step

    try:
        config, _ = parse_cli(argv, __doc__.splitlines()[0])
        params, model_config, tokenizer, delta, lora_config = common.load_model_with_adapter(
            config, config.lora_model_dir)
        data = prepare_datasets(data_spec(config), tokenizer)
    except (ConfigError, ModelLoadError, AdapterError, DataError, ValueError) as e:
        common.fail(str(e))
    eval_step = make_eval_step(sft, common.make_bind(config, model_config, params, lora_config, neftune_alpha=None))
    trainable = {"lora": delta} if delta is not None else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = {}
    for split, rows in (("eval", data.eval), ("train", data.train)):
        if not rows:
            continue
        examples = [dict(input_ids=r["input_ids"], labels=r["labels"]) for r in rows]
        batches = [common.tensors_only(b) for b in common.eval_micro_batches(examples, config, pad_id)]
        metrics = eval_step(trainable, batches)
        loss = metrics["eval/loss"].item()
        result[f"{split}_loss"] = loss
        result[f"{split}_perplexity"] = math.exp(loss)
        result[f"{split}_token_accuracy"] = metrics["eval/token_accuracy"].item()
        result[f"{split}_examples"] = len(examples)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

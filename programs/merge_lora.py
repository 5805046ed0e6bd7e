"""`python -m programs.merge_lora --config x.yaml [--lora_model_dir DIR]`: W <- W + s B A in fp32,
written as an HF model folder to `{output_dir}/merged`.

A quantised base (QLoRA, 8-bit, LoftQ) is rebuilt as the run trained it, dequantised by
bitsandbytes and merged in fp32, so the merged model computes what the adapter was trained on
(axolotl instead reloads the base unquantised and merges into the original weights, which adds
the quantisation error back)."""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv=None) -> int:
    from backends.export import AdapterError
    from backends.hf import ModelLoadError, save_pretrained
    from programs import common
    from programs.config import ConfigError, parse_cli
    from kernels.quantized import dequantize_params
    from pure.lora import merge_lora

    try:
        config, _ = parse_cli(argv, __doc__.splitlines()[0])
        params, model_config, tokenizer, delta, lora_config = common.load_model_with_adapter(
            config, config.lora_model_dir)
        if delta is None:
            raise AdapterError(f"no LoRA adapter found: set --lora_model_dir or train into {config.output_dir} first")
        target = Path(config.output_dir) / "merged"
        params = dequantize_params(params)
        save_pretrained(merge_lora(params, delta, lora_config), model_config, tokenizer, target)
    except (ConfigError, ModelLoadError, AdapterError, ValueError) as e:
        common.fail(str(e))
    print(f"merged adapter written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

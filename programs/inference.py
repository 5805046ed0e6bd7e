"""`python -m programs.inference --config x.yaml [--lora_model_dir DIR]`: prompts from stdin, replies
streamed from our own model with the KV cache (chat template applied).

Standard input holds one prompt; with `--prompt-per-line` each non-empty line is one prompt.
Greedy by default; `--temperature T --seed S` samples reproducibly.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    import torch

    from backends.export import AdapterError
    from backends.hf import ModelLoadError
    from programs import common
    from programs.config import ConfigError, parse_cli
    from pure import rng
    from pure.sampling import generate_tokens

    flags = {"--max-new-tokens": True, "--temperature": True, "--seed": True, "--prompt-per-line": False,
             "--top-p": True, "--top-k": True}
    try:
        config, extra = parse_cli(argv, __doc__.splitlines()[0], program_flags=flags)
        options = _options(extra)
        params, model_config, tokenizer, delta, lora_config = common.load_model_with_adapter(
            config, config.lora_model_dir)
    except (ConfigError, ModelLoadError, AdapterError, ValueError) as e:
        common.fail(str(e))
    text = sys.stdin.read()
    prompts = [l for l in text.splitlines() if l.strip()] if options["prompt_per_line"] else [text.strip()]
    for i, prompt in enumerate(p for p in prompts if p):
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
        else:
            rendered = prompt
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        produced = []
        with torch.inference_mode():
            for token in generate_tokens(params, model_config, [ids], max_new_tokens=options["max_new_tokens"],
                                         key=rng.fold_in(rng.key(options["seed"]), i),
                                         temperature=options["temperature"], top_p=options["top_p"],
                                         top_k=options["top_k"], eos_token_ids=[tokenizer.eos_token_id],
                                         pad_token_id=tokenizer.pad_token_id or 0, lora=delta,
                                         lora_config=lora_config, ops=common.quantized_ops(params)):
                if token.item() == tokenizer.eos_token_id:
                    break
                produced.append(token.item())
                sys.stdout.write(tokenizer.decode(produced[-1:]))
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _options(extra: list[str]) -> dict:
    options = {"max_new_tokens": 128, "temperature": 0.0, "seed": 0, "prompt_per_line": False, "top_p": 1.0,
               "top_k": 0}
    i = 0
    while i < len(extra):
        name, _, value = extra[i].partition("=")
        key = name.lstrip("-").replace("-", "_")
        if key == "prompt_per_line":
            options[key] = True
        else:
            if not value:
                i += 1
                value = extra[i]
            options[key] = type(options[key])(value)
        i += 1
    return options


if __name__ == "__main__":
    sys.exit(main())

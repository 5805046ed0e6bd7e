"""Generate a reply from a model with its chat template: a quick check that a model loads and talks.

    python -m programs.generate --model smollm2-135m-instruct --prompt "What is 7 times 8?"
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m programs.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded short name or HF folder")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from backends.hf import ModelLoadError, load_pretrained
    from pure import rng
    from pure.sampling import generate_tokens

    try:
        params, config, tokenizer = load_pretrained(args.model)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    print(f"> {args.prompt}")
    start, produced = time.perf_counter(), []
    with torch.inference_mode():
        for token in generate_tokens(params, config, [prompt], max_new_tokens=args.max_new_tokens,
                                     key=rng.key(args.seed), temperature=args.temperature,
                                     eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.eos_token_id):
            if token.item() == tokenizer.eos_token_id:
                break
            produced.append(token.item())
            sys.stdout.write(tokenizer.decode(produced[-1:]))
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    print(f"\n[{len(produced)} tokens in {elapsed:.2f} s, {len(produced) / max(elapsed, 1e-9):.1f} tokens/s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

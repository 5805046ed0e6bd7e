"""`python -m programs.train --config x.yaml`: dispatch on `rl:` / `reward_model:` (SFT when absent)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from programs import common
    from programs.config import ConfigError, parse_cli, training_kind

    try:
        config, _ = parse_cli(list(sys.argv[1:] if argv is None else argv), "Train with the method the config names.",
                              program_flags={"--overwrite": False})
    except ConfigError as e:
        common.fail(str(e))
    kind = training_kind(config)
    if kind == "sft":
        from programs import sft

        return sft.main(argv)
    if kind in ("dpo", "ipo", "simpo", "orpo", "kto"):
        from programs import preference

        return preference.main(argv)
    if kind in ("rm", "prm"):
        from programs import rm

        return rm.main(argv)
    if kind in ("grpo", "gdpo"):
        from programs import grpo

        return grpo.main(argv)
    common.fail(f"training method rl: {kind} is not supported yet by puretune; "
                "supported: sft, dpo, ipo, simpo, orpo, kto, grpo, gdpo, reward_model, process_reward_model")

if __name__ == "__main__":
    sys.exit(main())

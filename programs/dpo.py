"""DPO family: rl: dpo, ipo (and RPO / WPO through their keys), simpo. `python -m programs.dpo --config x.yaml [--key value ...] [--overwrite]`

The recipe is `programs/preference.py`; this entry point checks the config's `rl:`.
"""
import sys

from programs.preference import main as _main


def main(argv=None) -> int:
    return _main(argv, kinds=("dpo", "ipo", "simpo"), program="programs.dpo")


if __name__ == "__main__":
    sys.exit(main())

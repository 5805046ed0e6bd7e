"""KTO: rl: kto. `python -m programs.kto --config x.yaml [--key value ...] [--overwrite]`

The recipe is `programs/preference.py`; this entry point checks the config's `rl:`.
"""
import sys

from programs.preference import main as _main


def main(argv=None) -> int:
    return _main(argv, kinds=("kto",), program="programs.kto")


if __name__ == "__main__":
    sys.exit(main())

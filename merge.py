"""Entry point kept from the reference implementation: `python merge.py --config exp_config/config_lfs.yaml`.

Same as `auto-merge search --config ...`.
"""

import sys

from auto_merge.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))

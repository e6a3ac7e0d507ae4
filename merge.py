"""Entry point kept from the reference implementation: `python merge.py --config exp_config/config_lfs.yaml`.

Same as `auto-merge search --config ...`.
"""

import sys

from auto_merge.cli import main, reexec_with_fixed_hash_seed

if __name__ == "__main__":
    reexec_with_fixed_hash_seed()  # reproducible SMAC suggestions (see auto_merge.cli)
    sys.exit(main(["search", *sys.argv[1:]]))

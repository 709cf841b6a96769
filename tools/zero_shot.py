#!/usr/bin/env python
"""Zero-shot classification of an exported checkpoint: same as ``vlp eval zero-shot``.

Thin wrapper around :func:`vlp.cli.main`, e.g.::

    python tools/zero_shot.py --checkpoint runs/debug/export --data shards/test \
        --out eval/zero_shot --prompts my_prompts.yaml --figures
"""

import sys

from vlp.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "zero-shot", *sys.argv[1:]]))

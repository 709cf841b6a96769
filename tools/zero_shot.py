#!/usr/bin/env python
"""Prompts against raw radiographs: the same as ``vlp zero-shot``.

Prints each prompt's score and the softmax over the prompts for every image; ``--heatmap``
writes the model's region-score map of each prompt over each image::

    python tools/zero_shot.py --checkpoint runs/demo/run/export --image cxr.png \
        --prompt "pleural effusion" --prompt "no pleural effusion" --heatmap heatmaps/

The dataset-level zero-shot AUROC evaluation is ``vlp eval zero-shot``.
"""

import sys

from vlp.cli import main

if __name__ == "__main__":
    sys.exit(main(["zero-shot", *sys.argv[1:]]))

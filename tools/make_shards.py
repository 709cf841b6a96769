#!/usr/bin/env python
"""Convert MIMIC-CXR-JPG, Open-i IU X-ray or a CSV table into WebDataset shards.

Thin wrapper around :func:`vlp.data.convert.main`; see ``--help`` of each subcommand.
"""

import sys

from vlp.data.convert import main

if __name__ == "__main__":
    sys.exit(main())

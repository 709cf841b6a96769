#!/usr/bin/env python
"""Convert MIMIC-CXR (JPG or DICOM), Open-i IU X-ray, a CSV table or a folder of DICOM
radiographs into WebDataset shards.

Thin wrapper around :func:`vlp.data.convert.main`; see ``--help`` of each subcommand.
"""

import sys

from vlp.data.convert import main

if __name__ == "__main__":
    sys.exit(main())

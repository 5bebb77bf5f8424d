#!/usr/bin/env python3
"""`python scripts/train.py` from a checkout: the same as the installed `xpnet-train` command."""

import os
import sys

try:
    from xpnet.cli.train import main
except ImportError:  # a checkout without `pip install -e .`: use the package beside this script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xpnet.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

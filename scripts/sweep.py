#!/usr/bin/env python3
"""`python scripts/sweep.py` from a checkout: the same as the installed `xpnet-sweep` command."""

import os
import sys

try:
    from xpnet.cli.sweep import main
except ImportError:  # a checkout without `pip install -e .`: use the package beside this script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xpnet.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())

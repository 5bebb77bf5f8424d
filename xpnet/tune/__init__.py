"""Hyperparameter search over xpnet's training runs, on Optuna, with trials run in
this process or on Dask workers (``pip install "xpnet[tune]"``).

The core package does not import Optuna or Dask; this package imports them when
a sweep runs.
"""

from .space import SearchSpace, SpaceError, load_space_file, parse_space
from .sweep import SweepConfig, run_sweep

__all__ = ["SearchSpace", "SpaceError", "SweepConfig", "load_space_file", "parse_space", "run_sweep"]

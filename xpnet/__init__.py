"""xpnet: neural networks from explicit layer functions, on any array API backend.

The layers, networks, update rules and Solver follow the cs231n / ECE C147/C247
course code, written once against the Python array API standard so that the
same code runs on NumPy (CPU), CuPy (CUDA GPU), PyTorch and array-api-strict.
"""

from ._version import __version__
from .backend import Backend, get_backend, set_backend, using_backend
from .fc_net import FullyConnectedNet, TwoLayerNet

__all__ = [
    "__version__",
    "Backend",
    "FullyConnectedNet",
    "TwoLayerNet",
    "get_backend",
    "set_backend",
    "using_backend",
]

"""A toy backend, added the way a new library would be: one module, one registration.

It is array-api-strict's third device, "device2", under the spec "toy". Arrays there
are array-api-strict arrays, but on a device the built-in backend does not claim.
"""

from xpnet.backend import register_backend
from xpnet.backend.registry import import_library
from xpnet.backend.strict_backend import StrictBackend, is_strict_array


def make_toy(spec):
    lib = import_library("toy", "array_api_strict")
    return StrictBackend("toy", lib, lib.Device("device2"), lib)


register_backend("toy", make_toy, lambda x: is_strict_array(x, devices=("device2",)), install_hint="pip install toy")

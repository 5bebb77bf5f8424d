"""Plain data and NumPy arrays out of a pickle written elsewhere (the CIFAR-10 python batches),
without running anything the file names and without handing NumPy a state it would trust.

A pickle calls whatever functions it names, and NumPy's own rebuilders trust their arguments:
``ndarray.__new__`` allocates any shape a few bytes declare, and NumPy 2.4's
``ndarray.__setstate__`` given an object dtype and a list shorter than the shape reads past the
list's end (a crash, or arbitrary objects in the array). So a file may name only NumPy's array,
dtype and scalar rebuilders and ``_codecs.encode`` (for the bytes of Python 3 protocol-2
pickles), and each is a stand-in here: NumPy's only record their arguments, and encode takes
latin1 alone. The arrays are built after loading, with ``np.frombuffer`` over bytes whose length
matches the declared shape, in plain numeric dtypes (booleans, integers, floats; no objects,
fields or subarrays). Dicts, lists, tuples, strings, bytes and numbers need no global at all.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from collections.abc import Callable

import numpy as np

from .input_checks import short_repr

__all__ = ["load_plain", "UnsafePickleError", "ALLOWED_GLOBALS"]

# (module, name) a file may name: NumPy's under its NumPy 1 and NumPy 2 module names.
ALLOWED_GLOBALS = frozenset(
    [
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    ]
)
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_MAX_NESTING = 32  # far beyond a data file's dict of lists


class UnsafePickleError(ValueError):
    """The pickle asks for something a data file has no business asking for; says what."""


class _ArrayType:
    """What a file gets for ``numpy.ndarray``: a name to pass to ``_reconstruct``, not a constructor."""

    def __init__(self, *args):
        raise UnsafePickleError("calls numpy.ndarray directly, which a data file has no business doing")


class _Array:
    """Stands for ``_reconstruct(ndarray, (0,), 'b')``, the empty array that NumPy's pickles
    then fill with ``__setstate__``: the state is kept, and checked when the array is built."""

    state = None  # also for an instance made without __init__ (pickle's NEWOBJ)

    def __init__(self, subtype, shape, dtype):
        if subtype is not _ArrayType:
            raise UnsafePickleError(f"rebuilds an array of type {short_repr(subtype)}; only numpy.ndarray is read")

    def __setstate__(self, state):
        self.state = state


class _Dtype:
    """Stands for ``numpy.dtype(typecode, align, copy)`` and the state set on it."""

    typecode = state = None

    def __init__(self, typecode, align=False, copy=False):
        self.typecode = typecode

    def __setstate__(self, state):
        self.state = state


class _Scalar:
    """Stands for ``numpy.core.multiarray.scalar(dtype, data)``, a NumPy number."""

    dtype = data = None

    def __init__(self, dtype, data=None):
        self.dtype, self.data = dtype, data


class _FromBuffer:
    """Stands for ``numpy.core.numeric._frombuffer(buffer, dtype, shape, order)`` (protocol 5)."""

    buffer = dtype = shape = order = None

    def __init__(self, buffer, dtype, shape, order="C"):
        self.buffer, self.dtype, self.shape, self.order = buffer, dtype, shape, order


_STAND_INS: dict[str, Callable] = {
    "ndarray": _ArrayType,
    "_reconstruct": _Array,
    "dtype": _Dtype,
    "scalar": _Scalar,
    "_frombuffer": _FromBuffer,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, size: int):
        super().__init__(stream, encoding="bytes")
        self.encode_budget = size  # characters _codecs.encode may still turn into bytes

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"asks to load {module}.{name}, which a data file has no business loading; refused "
                "(the file may be malicious)"
            )
        return self._latin1_bytes if name == "encode" else _STAND_INS[name]  # each allowed global has a stand-in

    def _latin1_bytes(self, text, encoding="utf-8"):
        """``_codecs.encode`` as Python 3 pickles bytes in protocol 2: ``encode(text, 'latin1')``.
        Another codec (zlib's, say) is refused, and so are more bytes than the file holds: the
        memo lets a file encode one long string any number of times for a few bytes each."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafePickleError(f"encodes with {short_repr(encoding)}, where pickles write bytes as latin1")
        self.encode_budget -= len(text)
        if self.encode_budget < 0:
            raise UnsafePickleError("encodes more bytes than the file holds")
        return text.encode("latin-1")


def load_plain(file, size: int):
    """The object pickled in the binary ``file`` of ``size`` bytes, its NumPy arrays and numbers
    rebuilt as plain ones. Python 2 strings come back as bytes. The file is read into memory.

    Raises:
        UnsafePickleError: the file names a global outside :data:`ALLOWED_GLOBALS`, uses an opcode
            that builds objects no data file holds, or declares an array that is not plain numbers,
            does not match its bytes or is larger than the file.
        Whatever pickle raises for a damaged file (UnpicklingError, EOFError, ValueError, ...),
            among them a string or bytes longer than what follows it in the file.
    """
    stream = io.BytesIO(file.read(size + 1))
    _check_opcodes(stream)
    stream.seek(0)
    return _Resolver(size).resolve(_Unpickler(stream, size).load(), 0)


# Opcodes that build objects of classes, look up the extension registry or ask for buffers and
# persistent objects: nothing NumPy or a data file writes.
_REFUSED_OPCODES = frozenset(
    [
        "INST",
        "OBJ",
        "NEWOBJ",
        "NEWOBJ_EX",
        "EXT1",
        "EXT2",
        "EXT4",
        "PERSID",
        "BINPERSID",
        "NEXT_BUFFER",
        "READONLY_BUFFER",
    ]
)


_MEMO_PUTS = frozenset(["PUT", "BINPUT", "LONG_BINPUT"])


def _check_opcodes(stream: io.BytesIO) -> None:
    """Walks the opcodes without building anything: pickle itself allocates a string, bytes or
    bytearray as long as its length field says before reading it (a bytearray of 2**60 bytes
    from 9 of them), while here each is read from the bytes that are there, and a length beyond
    them raises ValueError. A memo index may not exceed the opcodes before it (a pickler numbers
    its memo from 0): pickle grows its memo table to the index, and one byte changed in a CIFAR-10
    batch asked for an index of 577,851,937, 4.6 GB and ten seconds."""
    for count, (opcode, argument, _) in enumerate(pickletools.genops(stream)):
        if opcode.name in _REFUSED_OPCODES:
            raise UnsafePickleError(f"uses the pickle opcode {opcode.name}, which no data file needs")
        if opcode.name in _MEMO_PUTS and isinstance(argument, int) and argument > count:
            raise UnsafePickleError(
                f"stores a memo entry at index {argument} after {count} opcodes; a pickler numbers them from 0"
            )


class _Resolver:
    """Replaces the stand-ins with NumPy objects, each container and stand-in once: a file may
    share one list among many (visited naively, exponential time) or one array's stand-in or
    bytes among many arrays, so the arrays built may hold no more bytes than the file."""

    def __init__(self, size: int):
        self.size = size
        self.budget = size  # bytes the arrays built may still take
        self.done: dict[int, tuple] = {}  # id -> (the object, what it became); the object kept, so ids stay unique

    def resolve(self, value, depth: int):
        if not isinstance(value, (dict, list, tuple, _Array, _FromBuffer, _Scalar, _Dtype)):
            return value
        if id(value) in self.done:
            return self.done[id(value)][1]
        if depth >= _MAX_NESTING:
            raise UnsafePickleError(f"nests containers more than {_MAX_NESTING} deep")
        if isinstance(value, tuple):
            result: object = tuple(self.resolve(v, depth + 1) for v in value)
        elif isinstance(value, list):
            self.done[id(value)] = (value, value)  # filled in place: a list that holds itself stays one
            value[:] = [self.resolve(v, depth + 1) for v in value]
            result = value
        elif isinstance(value, dict):
            self.done[id(value)] = (value, value)
            for key in list(value):
                value[key] = self.resolve(value[key], depth + 1)
            result = value
        else:
            result = self._numpy(value)
        self.done[id(value)] = (value, result)
        return result

    def _numpy(self, value):
        if isinstance(value, _Dtype):
            return _dtype(value)
        if isinstance(value, _Scalar):
            dtype = _dtype(value.dtype)
            data = _bytes(value.data, "a number's")
            if len(data) != dtype.itemsize:
                raise UnsafePickleError(f"stores a {dtype} number in {len(data)} bytes")
            return np.frombuffer(data, dtype)[0]
        if isinstance(value, _FromBuffer):
            return self._array(value.shape, value.dtype, value.order == "F", value.buffer)
        state = value.state
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("rebuilds an array without the state NumPy writes")
        shape, dtype, fortran, data = state[-4:]  # (version,) shape, dtype, is_fortran, data
        return self._array(shape, dtype, fortran, data)

    def _array(self, shape, dtype, fortran, data) -> np.ndarray:
        dtype = _dtype(dtype)
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise UnsafePickleError(f"declares an array of shape {short_repr(shape)}")
        declared = math.prod(shape) * dtype.itemsize
        if declared > self.size:
            raise UnsafePickleError(
                f"declares an array of shape {short_repr(shape)} ({declared} bytes) in a file of {self.size}"
            )
        if declared > self.budget:
            raise UnsafePickleError(f"rebuilds arrays of more bytes than the file holds ({self.size})")
        self.budget -= declared
        data = _bytes(data, "an array's")
        if len(data) != declared:
            raise UnsafePickleError(
                f"declares an array of shape {short_repr(shape)} and {dtype} ({declared} bytes) in {len(data)}"
            )
        # a bytearray, so that the array is writable like any other
        return np.frombuffer(bytearray(data), dtype).reshape(shape, order="F" if fortran else "C")


def _bytes(data, what: str) -> bytes | bytearray:
    """``data``, after checking that it is bytes: a file's bytes come as bytes, or as a bytearray
    in protocol 5 (whose out-of-band buffers are refused with their opcodes)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    raise UnsafePickleError(f"gives {what} data as a {type(data).__name__}, not bytes")


def _dtype(value) -> np.dtype:
    """A plain numeric NumPy dtype from a :class:`_Dtype` stand-in and its state."""
    if not isinstance(value, _Dtype):
        raise UnsafePickleError(f"gives an array a dtype of {type(value).__name__}")
    typecode = value.typecode.decode("latin-1") if isinstance(value.typecode, bytes) else value.typecode
    try:
        dtype = np.dtype(typecode) if isinstance(typecode, str) else None
    except Exception:  # NumPy's parser of type strings raises TypeError, ValueError and others
        dtype = None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickleError(
            f"declares the dtype {short_repr(typecode)}; only booleans, integers and floats are read"
        )
    state = value.state
    if state is not None:
        # (version, byte order, subarray, names, fields, itemsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 8 or state[2:5] != (None, None, None):
            raise UnsafePickleError(f"declares a dtype {short_repr(typecode)} with fields or a subarray")
        order = state[1].decode("latin-1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"declares the byte order {short_repr(order)}")
        if order in "<>":
            dtype = dtype.newbyteorder(order)
    return dtype

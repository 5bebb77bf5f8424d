"""Checks at the entry of the layer functions, in xpnet's words: which function,
which argument, which shapes or libraries. They read only shapes, dtypes and
types, never values, so they cost no device synchronisation."""

from __future__ import annotations

import functools
import numbers
import os
import reprlib
from collections.abc import Callable
from typing import Literal, ParamSpec, overload

from .backend import namespace
from .backend.dispatch import on_one_device, refusal
from .backend.registry import library_of

P = ParamSpec("P")

__all__ = [
    "layer_namespace",
    "file_path",
    "check_dout",
    "check_same_shape",
    "check_param_keys",
    "as_int",
    "is_number",
    "LayerCache",
    "makes_cache",
    "unpack_cache",
    "short_repr",
    "check_writable",
    "dtype_name",
]


def is_number(value) -> bool:
    """A real number, Python's or NumPy's (``np.float32(0.9)``), that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Values read from a file, shown in a message: pickle's memo and YAML's aliases let a file of
# a few hundred bytes hold a list whose full repr runs to gigabytes.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring = 2, 6, 6, 6, 60
_SHORT.maxother = 60


def check_writable(function: str, name: str, x, why: str) -> None:
    """ValueError naming ``function`` and ``name`` when array ``x`` is read-only (NumPy's memory
    maps, broadcasts and arrays over bytes), which ``why`` (the function's in-place writes) needs."""
    if getattr(getattr(x, "flags", None), "writeable", True) is False:
        raise ValueError(f"{function}: {name} is read-only, and {why}: give a writable copy, {name}.copy()")


def short_repr(value) -> str:
    """``repr(value)`` cut to two levels of nesting, six items and 60 characters a string."""
    return _SHORT.repr(value)


def is_array(value) -> bool:
    """Anything with a shape and a dtype: an array of any library (not a list or a number)."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer, Python's or NumPy's (``np.int64`` from
    ``np.random.choice`` in a course's search loop), else None; a bool is not one."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


_FLOAT_NAMES = ("float16", "float32", "float64")  # the dtypes the layers take
_FLOAT_DTYPES: dict = {}
_FLOAT_DTYPES_SEEN: dict = {}  # namespace -> the dtypes of arrays that passed as floating-point


def file_path(function: str, name: str, value, what: str = "a file path", hint: str = "") -> str:
    """``value`` as a path string with a leading ``~`` expanded (as the data folders are: a
    shell leaves ``--resume=~/run.npz`` as it is, and open() made a folder named ``~``), or a
    TypeError naming ``function`` and ``name`` (what it must be, then ``hint``): anything else
    failed inside os.fspath ("expected str, bytes or os.PathLike object, not dict"), which
    names neither. An empty path is a ValueError: save_checkpoint("") blamed the working folder."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{function}: {name} must be {what} (str or Path), got {type(value).__name__}{hint}")
    path = os.fspath(value)
    if not path:
        raise ValueError(f"{function}: {name} is an empty string, not a path")
    return os.path.expanduser(path)


@overload
def check_flag(name: str, value, nullable: Literal[False] = False) -> bool: ...
@overload
def check_flag(name: str, value, nullable: bool) -> bool | None: ...
def check_flag(name: str, value, nullable: bool = False) -> bool | None:
    """``value`` as True or False (a NumPy bool, 0 and 1 too; None where ``nullable``), or a
    ValueError naming ``name``: a string is truthy, so verbose='False' printed."""
    if value is None and nullable:
        return None
    if not isinstance(value, str) and getattr(value, "shape", ()) == () and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be True or False{' (or None)' if nullable else ''}, got {short_repr(value)}")


def check_seed(seed, name: str = "seed") -> int | None:
    """``seed`` as a Python int (None stays None), or a ValueError naming ``name``: NumPy's
    seeding would refuse a negative or non-integer seed without saying which setting it was."""
    if seed is None:
        return None
    number = as_int(seed)
    if number is None or number < 0:
        raise ValueError(f"{name} must be None or a non-negative integer, got {seed!r}")
    return number


def _float_dtypes(xp):
    dtypes = _FLOAT_DTYPES.get(xp)
    if dtypes is None:
        dtypes = _FLOAT_DTYPES[xp] = tuple(getattr(xp, n) for n in _FLOAT_NAMES if hasattr(xp, n))
    return dtypes


def dtype_name(dtype) -> str:
    """A dtype's name as every library would understand it in a message: int64, not
    array_api_strict.int64 or torch.int64."""
    return str(dtype).rsplit(".", 1)[-1]


def _refuse_dtype(xp, function: str, name: str, dtype) -> None:
    """TypeError naming ``name``'s dtype, which is not one of the float dtypes the layers take."""
    shown = dtype_name(dtype)
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"{function}: {name} must be a floating-point array, got dtype {shown}")
    info = xp.finfo(dtype)
    for float_name in _FLOAT_NAMES:
        float_dtype = getattr(xp, float_name, None)
        if float_dtype is not None and (info.bits, info.eps) == (xp.finfo(float_dtype).bits, xp.finfo(float_dtype).eps):
            # NumPy's big-endian float32 (read from a FITS or MATLAB file) computes the same values, but
            # the layers choose their float32 and float16 paths by dtype, and PyTorch and CuPy refuse it
            raise TypeError(
                f"{function}: {name} has dtype {shown}, {float_name} in the other byte order: "
                f"np.asarray({name}, dtype=np.{float_name}) converts it"
            )
    raise TypeError(f"{function}: {name} must be float16, float32 or float64, got dtype {shown}")


def _refuse_non_arrays(function: str, arrays: dict) -> None:
    """TypeError naming the first of ``arrays`` that is no array at all (a list, a number)."""
    for name, a in arrays.items():
        if not is_array(a):
            raise TypeError(
                f"{function}: {name} must be an array, got {type(a).__name__} (np.asarray({name}) makes one)"
            )


def refuse_unsupported_subclasses(function: str, arrays: dict) -> None:
    """TypeError naming the first of ``arrays`` whose library refuses its type (np.matrix)."""
    for name, a in arrays.items():
        reason = refusal(a)
        if reason is not None:
            raise TypeError(f"{function}: {name} is a {type(a).__name__}: {reason}")


def layer_namespace(function: str, floats: dict, others: dict | None = None):
    """The array namespace of a layer function's arrays, after checking them.

    Args:
        function: the layer function's name, for the messages.
        floats: argument name -> array that must hold floating-point values.
        others: argument name -> further arrays of the same library (labels).
    Raises:
        TypeError naming the function and the arguments when the arrays come from
        different libraries, when one is of a type its library refuses (np.matrix), or when
        one of ``floats`` holds integers or booleans; ValueError naming each argument's device
        when they are on different devices of one library.
    """
    values = [*floats.values(), *others.values()] if others else list(floats.values())
    kind = type(values[0])
    for a in values:  # a loop, not any(...): layers call this twice a step, and a generator costs more
        if type(a) is not kind:
            _refuse_mixed_libraries(function, {**floats, **(others or {})})
            break
    try:
        xp = namespace(*values)
    except TypeError as exc:
        _refuse_non_arrays(function, {**floats, **(others or {})})
        refuse_unsupported_subclasses(function, {**floats, **(others or {})})
        raise TypeError(f"{function}: unsupported array types ({exc})") from exc
    if not on_one_device(values[0]):  # arrays of one library on two devices (two GPUs): its error names neither
        where = values[0].device
        for a in values:
            if a.device != where:
                _refuse_mixed_devices(function, {**floats, **(others or {})})
    confirmed = _FLOAT_DTYPES_SEEN.setdefault(xp, set())
    for name, a in floats.items():
        if a.dtype in confirmed:  # a hash lookup; the test below compares with each float type
            continue
        if a.dtype not in _float_dtypes(xp):
            _refuse_dtype(xp, function, name, a.dtype)
        confirmed.add(a.dtype)
    return xp


def _refuse_mixed_libraries(function: str, arrays: dict) -> None:
    """TypeError naming a non-array among ``arrays``, or the libraries when they are several."""
    _refuse_non_arrays(function, arrays)
    libraries = {name: library_of(a) for name, a in arrays.items()}
    if len(set(libraries.values())) > 1:
        listed = ", ".join(f"{name} from {lib}" for name, lib in libraries.items())
        raise TypeError(
            f"{function}: arrays from different libraries ({listed}); move them to one backend first (backend.asarray)"
        )


def _refuse_mixed_devices(function: str, arrays: dict) -> None:
    """ValueError naming the device of each of ``arrays``, which are of one library but not on one device."""
    listed = ", ".join(f"{name} on {a.device}" for name, a in arrays.items())
    raise ValueError(
        f"{function}: arrays on different devices ({listed}); move them to one device first (backend.asarray)"
    )


class LayerCache(tuple):
    """A forward pass's cache: the tuple of its parts (it unpacks, indexes and compares as
    one), whose class also names the forward passes that make it. Another layer's cache of as
    many parts would otherwise reach the backward pass's arithmetic and fail there, or give
    numbers. Each kind is a subclass made by :func:`makes_cache`."""

    __slots__ = ()
    forwards: tuple[str, ...] = ()

    def __reduce__(self):  # by its names: the kinds are made at import, not found as module attributes
        return _rebuild_cache, (self.forwards, tuple(self))


_CACHE_KINDS: dict[tuple[str, ...], type[LayerCache]] = {}


def _rebuild_cache(forwards: tuple[str, ...], parts: tuple) -> tuple:
    """An unpickled :class:`LayerCache` (a plain tuple where this version has no such kind)."""
    kind = _CACHE_KINDS.get(forwards)
    return parts if kind is None else kind(parts)


def makes_cache(*forwards: str) -> Callable[[Callable[P, tuple]], Callable[P, tuple]]:
    """Decorate a forward pass whose cache :func:`unpack_cache` is to know by name: its tuple
    cache comes back as a :class:`LayerCache` of the kind ``forwards`` (the function's name,
    with the other names that make the same cache). Other caches (None in test mode, an
    array, a fused kernel's record) come back as they are."""
    kind = _CACHE_KINDS.get(forwards)
    if kind is None:
        kind = _CACHE_KINDS[forwards] = type(
            f"{forwards[0]}_cache", (LayerCache,), {"__slots__": (), "forwards": forwards}
        )

    def decorate(forward: Callable[P, tuple]) -> Callable[P, tuple]:
        @functools.wraps(forward)
        def tagged(*args: P.args, **kwargs: P.kwargs) -> tuple:
            out, cache = forward(*args, **kwargs)
            return out, (kind(cache) if type(cache) is tuple else cache)

        return tagged

    return decorate


def check_cache_source(function: str, cache, forward: str) -> None:
    """ValueError saying that ``function`` got another layer's cache where ``cache`` says which
    forward passes make it (``forwards``: a :class:`LayerCache`, or a fused kernels' record) and
    ``forward`` is not one of them."""
    made_by = getattr(cache, "forwards", ()) if isinstance(cache, tuple) else ()
    if made_by and forward not in made_by:
        raise ValueError(
            f"{function}: cache comes from {made_by[0]}, not {forward}; pass the cache of the matching forward pass"
        )


def unpack_cache(function: str, cache, parts: int, forward: str) -> tuple:
    """``cache`` as the tuple of ``parts`` that ``forward`` returned, or a ValueError saying that
    ``function`` got another layer's cache: one that says it comes from another forward pass
    (:class:`LayerCache`), or one of another part count (tuple unpacking would say only the count)."""
    check_cache_source(function, cache, forward)
    if not isinstance(cache, tuple) or len(cache) != parts:
        got = f"a tuple of {len(cache)}" if isinstance(cache, tuple) else type(cache).__name__
        raise ValueError(
            f"{function}: cache is {got}, not the {parts} parts {forward} returns; "
            "pass the cache of the matching forward pass"
        )
    return cache


def array_cache(function: str, cache, forward: str):
    """``cache`` when it can be the one array that ``forward`` returned (an activation's input),
    or a ValueError when it is another layer's tuple of parts."""
    if isinstance(cache, tuple):
        raise ValueError(
            f"{function}: cache is a tuple of {len(cache)}, not the array {forward} returns; "
            "pass the cache of the matching forward pass"
        )
    return cache


def check_dout(function: str, dout, expected, detail: str = "", like: dict | None = None):
    """The namespace of ``dout``, after checking it as :func:`layer_namespace` checks a layer's
    input (an array, floating-point, of the library of the cache's arrays ``like``: name ->
    array) and that it has the ``expected`` shape (its forward pass's output); else an error
    naming ``function``. ``detail`` follows the shapes in the message."""
    xp = layer_namespace(function, {"dout": dout}, like)
    if tuple(dout.shape) != tuple(expected):
        raise ValueError(f"{function}: dout has shape {tuple(dout.shape)}, expected {tuple(expected)}{detail}")
    return xp


def check_same_shape(function: str, name: str, a, reference_name: str, reference) -> None:
    """ValueError when ``a`` (e.g. dout) does not have the shape of ``reference``."""
    if tuple(a.shape) != tuple(reference.shape):
        raise ValueError(
            f"{function}: {name} has shape {tuple(a.shape)} but {reference_name} has shape {tuple(reference.shape)}"
        )


def check_param_keys(function: str, name: str, param, known: tuple) -> None:
    """TypeError unless ``param`` is a dict; ValueError naming the keys of it that ``function``
    does not read, since a misspelt key would otherwise be ignored and its default used."""
    if not isinstance(param, dict):
        raise TypeError(f"{function}: {name} must be a dict, got {type(param).__name__}")
    unknown = [key for key in param if key not in known]
    if unknown:
        raise ValueError(
            f"{function}: {name} has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(map(repr, known))}"
        )

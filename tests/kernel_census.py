"""Count what a training step would launch on CuPy, and the bytes each launch moves, on the CPU.

The step runs through :mod:`xpnet.backend.cupy_kernels` itself, loaded against the CPU
stand-in for ``cupy`` of :mod:`cpu_kernels` (so every fused kernel and the Python around
it runs as on a GPU), on NumPy arrays of a subclass that records each operation that
would be a kernel on CuPy: an elementwise operation or reduction, a copy (``astype``,
a non-contiguous ``reshape``, ``ascontiguousarray``, an assignment into a slice), a
gather (``take``), a fill (``zeros``, ``ones``), one of the fused kernels, or a GEMM
(with its FLOPs). Views (``reshape`` of a contiguous array, transposes, slices) record
nothing, as they launch nothing.

Each launch is recorded with its name, the bytes it reads (each operand's distinct
elements once: a per-channel operand broadcast over an activation counts as (C,)) and
the bytes it writes. This is a count, not a timing: it says how many kernels a step
launches, how much memory traffic it implies at the least, and which launches move
activation-sized arrays, so that a copy nobody meant to make shows up without a GPU.

    python tests/kernel_census.py [--step recipe|convnet] [--batch 32,64] [--widths 64,256,256] [--at 1024]
                                  [--warp-plane-sums] [--direct-convs]

prints one training step's launches (the fast CIFAR-10 recipe's, or the course's
ThreeLayerConvNet's under the Solver), grouped by name, at each batch size, and the
traffic extrapolated to ``--at`` images (the bytes are affine in the batch size; two
sizes fix both terms). :func:`step_census` counts any other step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_kernels  # noqa: E402


@dataclass
class Launch:
    name: str
    read: int  # bytes
    written: int
    flops: int = 0
    shape: tuple = ()


@dataclass
class Census:
    launches: list = field(default_factory=list)
    recording: bool = False
    depth: int = 0  # inside a recorded operation: what it does within is part of it

    def record(self, name, inputs, outputs, flops=0, read=None):
        if self.recording and self.depth == 0:
            read = sum(_footprint(a) for a in _unique_arrays(inputs)) if read is None else read
            written = sum(_footprint(a) for a in _unique_arrays(outputs))
            shape = next((tuple(a.shape) for a in outputs if isinstance(a, np.ndarray)), ())
            self.launches.append(Launch(name, read, written, flops, shape))

    @contextlib.contextmanager
    def inside(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def table(self) -> list[tuple]:
        """(name, launches, MB read, MB written, GFLOP) by name, most bytes first."""
        rows: dict = {}
        for launch in self.launches:
            row = rows.setdefault(launch.name, [0, 0, 0, 0])
            row[0] += 1
            row[1] += launch.read
            row[2] += launch.written
            row[3] += launch.flops
        table = [(name, n, r / 1e6, w / 1e6, f / 1e9) for name, (n, r, w, f) in rows.items()]
        return sorted(table, key=lambda row: -(row[2] + row[3]))

    @property
    def bytes(self) -> int:
        return sum(launch.read + launch.written for launch in self.launches)

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)


CENSUS = Census()


def _footprint(a) -> int:
    """The bytes of a's distinct elements (a broadcast axis, of stride 0, counts once)."""
    if not isinstance(a, np.ndarray):
        return 0
    return a.itemsize * math.prod(n for n, s in zip(a.shape, a.strides) if s != 0)


def _unique_arrays(values):
    seen, out = set(), []
    for value in values:
        if isinstance(value, np.ndarray) and id(value) not in seen:
            seen.add(id(value))
            out.append(value)
    return out


def _plain(value):
    """value with every Tracked array in it (in lists, tuples, dicts) viewed as a plain ndarray."""
    if isinstance(value, Tracked):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _tracked(value):
    if isinstance(value, np.ndarray) and not isinstance(value, Tracked):
        return value.view(Tracked)
    if isinstance(value, tuple):
        return tuple(_tracked(v) for v in value)
    if isinstance(value, list):
        return [_tracked(v) for v in value]
    return value


def _flat_arrays(value) -> list:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _flat_arrays(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _flat_arrays(v)]
    return []


def _is_view(result, inputs) -> bool:
    """Whether every array in ``result`` shares memory with one of ``inputs`` (nothing launched)."""
    outs = _flat_arrays(result)
    return bool(outs) and all(any(np.may_share_memory(o, a) for a in inputs) for o in outs)


_ALLOCATIONS = {"empty_like"}  # new memory, nothing written: no launch


class Tracked(np.ndarray):
    """A NumPy array whose operations are recorded in :data:`CENSUS`."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        kwargs = _plain(kwargs)
        with CENSUS.inside():
            result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        outputs = _flat_arrays(result if out is None else out)
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        CENSUS.record(name, _flat_arrays(inputs), outputs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _tracked(result)

    def __array_function__(self, func, types, args, kwargs):
        inputs = _flat_arrays(args) + _flat_arrays(kwargs)
        with CENSUS.inside():
            result = func(*_plain(args), **_plain(kwargs))
        if not _is_view(result, inputs) and _flat_arrays(result) and func.__name__ not in _ALLOCATIONS:
            name = func.__name__
            if name == "take":  # reads the rows it gathers and the indices, not the whole source
                CENSUS.record(name, (), _flat_arrays(result), read=2 * _footprint(_flat_arrays(result)[0]))
            else:
                CENSUS.record(name, inputs, _flat_arrays(result))
        return _tracked(result)

    def __setitem__(self, index, value):
        with CENSUS.inside():
            np.ndarray.__setitem__(self.view(np.ndarray), _plain(index), _plain(value))
        target = self.view(np.ndarray)[_plain(index)]
        CENSUS.record("copy into a slice" if isinstance(value, np.ndarray) else "fill", _flat_arrays([value]), [target])

    def astype(self, dtype, *args, **kwargs):
        with CENSUS.inside():
            result = self.view(np.ndarray).astype(dtype, *args, **kwargs)
        if not np.may_share_memory(result, self):
            CENSUS.record("astype", [self], [result])
        return _tracked(result)

    def copy(self, *args, **kwargs):
        with CENSUS.inside():
            result = self.view(np.ndarray).copy(*args, **kwargs)
        CENSUS.record("copy", [self], [result])
        return _tracked(result)

    def reshape(self, *shape, **kwargs):
        with CENSUS.inside():
            result = self.view(np.ndarray).reshape(*shape, **kwargs)
        if not np.may_share_memory(result, self):
            CENSUS.record("copy (reshape)", [self], [result])
        return _tracked(result)


def _creating(function, name, fills: bool):
    """np.zeros and the like, giving Tracked arrays (a fill recorded where the values are written)."""

    def create(*args, **kwargs):
        result = function(*args, **kwargs)
        if CENSUS.depth:
            return result
        if fills:
            CENSUS.record(name, (), [result])
        return _tracked(result)

    return create


_CREATORS = {"empty": False, "zeros": True, "ones": True, "full": True, "arange": True}


@contextlib.contextmanager
def tracked_numpy():
    """NumPy's creation functions give Tracked arrays, and NumPy's backend owns them."""
    from xpnet.backend.numpy_backend import NumpyBackend

    saved = {name: getattr(np, name) for name in _CREATORS}
    owns = NumpyBackend.owns
    try:
        for name, fills in _CREATORS.items():
            setattr(np, name, _creating(saved[name], name, fills))
        NumpyBackend.owns = lambda self, x: isinstance(x, np.ndarray)
        yield
    finally:
        for name, function in saved.items():
            setattr(np, name, function)
        NumpyBackend.owns = owns


def _recorded_kernel(base):
    class Recorded(base):
        def __call__(self, *args, **kwargs):
            raw = isinstance(self, cpu_kernels._RawKernel)
            arrays = _flat_arrays(list(args))
            with CENSUS.inside():
                before = [np.array(a, copy=True) for a in _plain(arrays)] if raw else []
                result = super().__call__(*_plain(args), **kwargs)
            outputs = _flat_arrays(result)
            if raw:  # its outputs are among its arguments: the arrays whose values it changed
                written = [not np.array_equal(a, b, equal_nan=True) for a, b in zip(arrays, before)]
                outputs = [a for a, w in zip(arrays, written) if w]
                inputs = [a for a, w in zip(arrays, written) if not w]
            elif isinstance(self, cpu_kernels._ElementwiseKernel) and len(args) > len(outputs):
                # outputs passed in: the last len(outputs) arguments
                inputs = args[: len(args) - len(outputs)]
            else:
                inputs = args
            name = getattr(getattr(self, "source", None), "name", None) or getattr(self, "name", "raw kernel")
            CENSUS.record(f"kernel {name}", _flat_arrays(list(inputs)), outputs)
            return _tracked(result)

    return Recorded


def _recorded_function(function, name):
    def run(*args, **kwargs):
        with CENSUS.inside():
            result = function(*_plain(args), **_plain(kwargs))
        inputs = _flat_arrays(args)
        if not _is_view(result, inputs) and _flat_arrays(result):
            CENSUS.record(name, inputs, _flat_arrays(result))
        return _tracked(result)

    return run


def census_kernels():
    """CupyKernels on the CPU (:func:`cpu_kernels.cupy_kernels_on_cpu`) whose every launch,
    GEMM and copy is recorded in :data:`CENSUS`."""
    originals = (cpu_kernels._ElementwiseKernel, cpu_kernels._ReductionKernel, cpu_kernels._RawKernel)
    original_module = cpu_kernels.cupy_on_cpu

    def recording_cupy():
        fake = original_module()
        fake.ElementwiseKernel, fake.ReductionKernel, fake.RawKernel = (_recorded_kernel(k) for k in originals)
        fake.ascontiguousarray = _recorded_function(np.ascontiguousarray, "copy to C order")
        fake.ones = _creating(np.ones, "ones", True)
        fake.zeros = _creating(np.zeros, "zeros", True)
        fake.empty = _creating(np.empty, "empty", False)
        return fake

    cpu_kernels.cupy_on_cpu = recording_cupy
    try:
        kernels = cpu_kernels.cupy_kernels_on_cpu()
    finally:
        cpu_kernels.cupy_on_cpu = original_module

    def gemm(a, b):
        with CENSUS.inside():
            result = cpu_kernels._cublas_like_matmul(a.view(np.ndarray), b.view(np.ndarray))
        m, k = a.shape
        CENSUS.record("GEMM", [a, b], [result], flops=2 * m * k * b.shape[1])
        return _tracked(result)

    def column_sums(a):
        with CENSUS.inside():
            result = a.view(np.ndarray).sum(axis=0)
        CENSUS.record("GEMM (column sums)", [a], [result], flops=2 * a.size)
        return _tracked(result)

    kernels.matmul, kernels.column_sums = (lambda a, b, exact=False: gemm(a, b)), column_sums
    return kernels


def _convert(obj, memo):
    """obj with its NumPy arrays (in attributes, dicts, lists, tuples) viewed as Tracked, in place where it can."""
    if isinstance(obj, np.ndarray):
        if id(obj) not in memo:
            memo[id(obj)] = obj if isinstance(obj, Tracked) else obj.view(Tracked)
        return memo[id(obj)]
    if id(obj) in memo:
        return obj
    if isinstance(obj, dict):
        memo[id(obj)] = obj
        for key, value in obj.items():
            obj[key] = _convert(value, memo)
    elif isinstance(obj, list):
        memo[id(obj)] = obj
        obj[:] = [_convert(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        items = [_convert(v, memo) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    elif type(obj).__module__.startswith("xpnet") and hasattr(obj, "__dict__"):
        memo[id(obj)] = obj
        for key, value in list(vars(obj).items()):
            converted = _convert(value, memo)
            if converted is not value:  # a view of the same rows: past the Solver's guard on replacing its data
                object.__setattr__(obj, key, converted)
    return obj


def step_census(build, kernels=None) -> Census:
    """The launches of one call of the step that ``build()`` returns (built with NumPy's
    arrays Tracked and the fused kernels on them), after one call that is not counted:
    the first step makes what later steps reuse."""
    from xpnet.backend import dispatch

    kernels = kernels or census_kernels()
    saved = dispatch._ACCELERATORS.get(Tracked)
    dispatch._ACCELERATORS[Tracked] = kernels
    try:
        with tracked_numpy(), np.errstate(all="ignore"):
            step, owner = build()
            _convert(owner, {})
            step()
            CENSUS.launches.clear()
            CENSUS.recording = True
            try:
                step()
            finally:
                CENSUS.recording = False
    finally:
        if saved is None:
            dispatch._ACCELERATORS.pop(Tracked, None)
        else:
            dispatch._ACCELERATORS[Tracked] = saved
    census = Census(list(CENSUS.launches))
    CENSUS.launches.clear()
    return census


def recipe_step_census(batch: int, widths=(64, 256, 256), dtype="float32", kernels=None) -> Census:
    """The launches of one fast CIFAR-10 recipe training step (minibatch gather, forward,
    backward, update; the lookahead, every fifth step, apart) at ``batch`` images."""
    from xpnet import get_backend
    from xpnet.cnn import FastConvNet
    from xpnet.recipes import Fast94Settings, Fast94Trainer
    from xpnet.whitening import whitening_filters

    def build():
        backend = get_backend("numpy")
        settings = Fast94Settings().with_overrides(dict(widths=widths, batch_size=batch, epochs=1, dtype=dtype))
        rng = np.random.default_rng(0)
        images = backend.asarray(rng.standard_normal((2 * batch, 3, 32, 32)), dtype=dtype)
        labels = backend.asarray(rng.integers(0, 10, 2 * batch))
        model = FastConvNet(widths=widths, dtype=dtype, backend=backend, seed=0)
        model.frozen["whiten_W"][...] = whitening_filters(images, 2, settings.whiten_eps)
        trainer = Fast94Trainer(model, images, labels, settings, seed=0)
        trainer.augmenter.epoch(0)
        trainer.sampler.start_epoch(backend.rng((0, 3, 0)))
        return trainer._step, trainer

    return step_census(build, kernels)


def convnet_step_census(batch: int, dtype="float32", kernels=None) -> Census:
    """The launches of one Solver step of the course's ThreeLayerConvNet (32 filters 7×7,
    100 hidden, plain SGD) on (batch, 3, 32, 32) inputs, as ``bench.py --suite conv`` times it."""
    from xpnet import get_backend
    from xpnet.cnn import ThreeLayerConvNet
    from xpnet.solver import Solver

    def build():
        backend = get_backend("numpy")
        rng = np.random.default_rng(0)
        X = backend.asarray(rng.standard_normal((4 * batch, 3, 32, 32)), dtype=dtype)
        y = backend.asarray(rng.integers(0, 10, 4 * batch))
        model = ThreeLayerConvNet(weight_scale=1e-2, seed=0, backend=backend, dtype=dtype)
        data = {"X_train": X, "y_train": y, "X_val": X[:batch], "y_val": y[:batch]}
        solver = Solver(model, data, update_rule="sgd", optim_config={"learning_rate": 1e-3}, batch_size=batch,
                        verbose=False)  # fmt: skip
        step_rng = backend.rng(1)
        return (lambda: solver.step(step_rng)), solver

    return step_census(build, kernels)


STEPS = {"recipe": recipe_step_census, "convnet": convnet_step_census}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=sorted(STEPS), default="recipe", help="which training step to count")
    parser.add_argument("--batch", default="32,64", help="two batch sizes (comma-separated)")
    parser.add_argument("--widths", default="64,256,256", help="the recipe's widths")
    parser.add_argument("--at", type=int, default=1024, help="the batch size to extrapolate the traffic to")
    parser.add_argument(
        "--bandwidth", type=float, default=4.3, help="TB/s for the traffic's floor (H200: 4.3 measured)"
    )
    parser.add_argument(
        "--warp-plane-sums", action="store_true", help="batchnorm's per-plane sums through PLANE_SUMS, a warp per plane"
    )
    parser.add_argument(
        "--direct-convs", action="store_true", help="convolutions of at most 32 taps through the direct kernels"
    )
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    widths = tuple(int(w) for w in args.widths.split(","))
    kernels = census_kernels()
    kernels.warp_plane_sums = args.warp_plane_sums
    kernels.direct_small_convs = args.direct_convs
    if args.step == "recipe":
        results = {b: recipe_step_census(b, widths, kernels=kernels) for b in batches}
    else:
        results = {b: STEPS[args.step](b, kernels=kernels) for b in batches}
    for b, census in results.items():
        print(f"\n== one {args.step} step at batch {b}: {len(census.launches)} launches, "
              f"{census.bytes / 1e6:.1f} MB, {census.flops / 1e9:.2f} GFLOP")  # fmt: skip
        print(f"{'launch':48} {'n':>5} {'MB read':>10} {'MB written':>10} {'GFLOP':>8}")
        for name, n, read, written, gflop in results[b].table():
            print(f"{name[:48]:48} {n:5d} {read:10.2f} {written:10.2f} {gflop:8.3f}")
    if len(batches) == 2:
        (b0, c0), (b1, c1) = results.items()
        per_image = (c1.bytes - c0.bytes) / (b1 - b0)
        fixed = c0.bytes - per_image * b0
        at = fixed + per_image * args.at
        flops = c0.flops + (c1.flops - c0.flops) / (b1 - b0) * (args.at - b0)
        print(f"\nat batch {args.at}: {at / 1e9:.2f} GB of traffic ({fixed / 1e6:.1f} MB fixed + "
              f"{per_image / 1e6:.2f} MB an image), {at / (args.bandwidth * 1e12) * 1e3:.2f} ms at "
              f"{args.bandwidth} TB/s; {flops / 1e12:.3f} TFLOP; {len(c1.launches)} launches")  # fmt: skip
        counts0, counts1 = Counter(x.name for x in c0.launches), Counter(x.name for x in c1.launches)
        if counts0 != counts1:
            print("note: the launches differ between the two batch sizes:", counts0 - counts1, counts1 - counts0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fast CIFAR-10 recipe: :class:`~xpnet.cnn.FastConvNet` trained for 9.9 epochs at
batch 1024 with Nesterov SGD, label smoothing, a warm-up-then-decay schedule, lookahead,
alternating flips and translations, then evaluated with test-time augmentation.

Everything runs on the model's device: the data set is moved once, each epoch's
augmented images are drawn there, and a whole training step (minibatch selection,
forward, backward, update) can be captured as one CUDA graph and replayed for every
step of the epochs in which the whitening bias trains, and as another for every step
after them. The lookahead, due every fifth step (the host counts), is a third graph,
replayed at each of its points.

The timed seconds count what the published recipe counts: the whitening layer's
initialisation, training and the final evaluation with TTA; not loading the files or
building the network.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from ..array_types import Array
from ..augment import AlternatingFlipTranslate, check_reflect_pad, tta_scores
from ..backend import Backend, get_backend, namespace
from ..batching import accuracy
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..cnn import FastConvNet
from ..data_checks import validate_split
from ..input_checks import as_int, check_flag, file_path, is_array, is_number
from ..model import check_input_dim, values_at_most
from ..training.graph import GraphReplay
from ..training.guard import DivergenceWarning
from ..training.lookahead import Lookahead, cubic_lookahead_decay
from ..training.sampling import EpochPermutation
from ..training.update import Update

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Fast94Settings",
    "Fast94Result",
    "Fast94Trainer",
    "fast94",
    "save_fast94_model",
    "load_fast94_model",
    "device_data",
    "timed_run",
    "recipe_model",
    "normalized_images",
    "sgd_hyper_parameters",
    "warmup_decay",
]

CIFAR10_CLASSES = 10
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Fast94Settings:
    """The recipe's hyper-parameters (the published values by default).

    Attributes:
        widths: the three conv groups' widths.
        batch_size, epochs: minibatch size and passes over the training set (a fraction
            ends part-way through the last epoch: ceil(epochs · N // batch_size) steps).
        learning_rate, weight_decay: per 1024 examples, in the recipe's decoupled form
            (see :func:`sgd_hyper_parameters`); momentum: Nesterov momentum.
        bias_scaler: the batchnorm biases' learning rate is this many times the others'.
        label_smoothing: ε of the summed softmax loss.
        whiten_bias_epochs: epochs during which the whitening layer's bias trains.
        whiten_images, whiten_eps: images and eps of the whitening filters.
        warmup, start_factor, final_factor: the learning rate rises linearly from
            start_factor to 1 over the first ``warmup`` fraction of the steps, then falls
            linearly to final_factor at the last step.
        lookahead_every: steps between lookahead points (0: no lookahead).
        flip, translate: alternating flips; translations of up to ``translate`` pixels.
        tta_level: 0 none, 1 mirror, 2 mirror and 1-pixel translations.
        scale, bn_momentum, bn_eps: of :class:`~xpnet.cnn.FastConvNet`.
        dtype: "float32" or "float64": the parameters' and the optimizer's.
        activation_dtype: None (dtype) or "float16": half-precision activations with the
            parameters kept in dtype, as :class:`~xpnet.cnn.FastConvNet` takes it.
        cuda_graph: capture the training step (None: where the backend can).
        tf32: let GEMMs use TF32 tensor cores (CuPy).
        cudnn: run the convolutions through cuDNN instead of im2col + cuBLAS (CuPy).
        conv_autotune: each convolution along the fastest of its paths, timed in its first
            step (CuPy; :meth:`~xpnet.backend.cupy_backend.CupyBackend.set_conv_autotune`).
    """

    widths: tuple = (64, 256, 256)
    batch_size: int = 1024
    epochs: float = 9.9
    learning_rate: float = 11.5
    weight_decay: float = 0.0153
    momentum: float = 0.85
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    whiten_images: int = 5000
    whiten_eps: float = 5e-4
    warmup: float = 0.23
    start_factor: float = 0.2
    final_factor: float = 0.07
    lookahead_every: int = 5
    flip: bool = True
    translate: int = 2
    tta_level: int = 2
    scale: float = 1 / 9
    bn_momentum: float = 0.6
    bn_eps: float = 1e-12
    dtype: str = "float32"
    activation_dtype: str | None = None
    cuda_graph: bool | None = None
    tf32: bool = False
    cudnn: bool = False
    conv_autotune: bool = False

    def with_overrides(self, overrides: dict) -> Fast94Settings:
        """A copy with ``overrides`` applied; an unknown name, or a value of the wrong kind
        (a word where a number goes, two widths), is refused by name."""
        defaults = {f.name: f.default for f in fields(self)}  # the published values say each setting's kind
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(f"fast94: unknown settings {', '.join(unknown)}; valid ones: {', '.join(defaults)}")
        checked = {name: _checked(name, value, defaults[name]) for name, value in overrides.items()}
        settings = replace(self, **checked)
        if settings.batch_size < 2 or settings.epochs <= 0:
            raise ValueError(
                f"fast94: batch_size must be >= 2 and epochs > 0, got {settings.batch_size}, {settings.epochs}"
            )
        for name, (allowed, fits) in _RANGES.items():  # before any data moves, in the user's own terms
            if not fits(getattr(settings, name)):
                raise ValueError(f"fast94: {name} must be {allowed}, got {getattr(settings, name)!r}")
        return settings


def _dtype_name(value) -> str:
    """'float32' for "float32", np.float32 and np.dtype('float32') alike."""
    return getattr(value, "__name__", None) or str(value)


# Settings whose default does not say what else they take: what they take, and a test of it.
_FLOATS = ("float16", "float32", "float64")
_CHOICES = {
    "dtype": ("'float32' or 'float64'", lambda v: _dtype_name(v) in _FLOATS[1:]),
    "activation_dtype": ("None or 'float16'", lambda v: v is None or _dtype_name(v) in _FLOATS),
    "cuda_graph": ("None, True or False", lambda v: v is None or isinstance(v, bool)),
}


# The values each number may take. Out of range, some failed only at the evaluation after the
# whole training run (tta_level), others in the converted terms of the SGD rule (momentum 1.5
# as a negative learning rate).
_RANGES = {
    "learning_rate": ("> 0", lambda v: v > 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "bias_scaler": ("> 0", lambda v: v > 0),
    "label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),
    "whiten_bias_epochs": (">= 0", lambda v: v >= 0),
    "whiten_images": (">= 1", lambda v: v >= 1),
    "whiten_eps": ("> 0", lambda v: v > 0),
    "warmup": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "start_factor": (">= 0", lambda v: v >= 0),
    "final_factor": (">= 0", lambda v: v >= 0),
    "lookahead_every": (">= 0 (0: no lookahead)", lambda v: v >= 0),
    "translate": (">= 0", lambda v: v >= 0),
    "tta_level": ("0, 1 or 2", lambda v: v in (0, 1, 2)),
    "scale": ("> 0", lambda v: v > 0),
    "bn_momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "bn_eps": ("> 0", lambda v: v > 0),
}


def _checked(name: str, value, default):
    """``value`` for the setting ``name`` whose default is ``default``, or a ValueError that
    names both: a bool where the default is one, an integer for an integer, a finite
    number for a float, three positive integers for the widths."""
    if name == "widths":
        try:
            widths = () if isinstance(value, str) else tuple(value)
        except TypeError:  # not a sequence at all
            widths = ()
        if len(widths) != 3 or not all(as_int(w) is not None and w > 0 for w in widths):
            raise ValueError(f"fast94: widths must be three positive integers, got {value!r}")
        return tuple(int(w) for w in widths)
    if name in _CHOICES:
        kind, fits = _CHOICES[name]
        ok = fits(value)
    elif isinstance(default, bool):
        kind, ok = "True or False", isinstance(value, bool)
    elif isinstance(default, int):
        kind, ok = "an integer", as_int(value) is not None
        value = as_int(value) if ok else value
    elif isinstance(default, float):
        kind = "a finite number"
        ok = is_number(value) and math.isfinite(value)
        value = float(value) if ok else value  # NumPy's floats too, as Python floats: the settings go to JSON
    else:
        kind, ok = f"of type {type(default).__name__}", isinstance(value, type(default))
    if not ok:
        raise ValueError(f"fast94: {name} must be {kind}, got {value!r}")
    return value


@dataclass
class Fast94Result:
    """What :func:`fast94` reports.

    Attributes:
        test_accuracy: on the test images, with TTA.
        seconds: the timed total (whitening + training + evaluation), and each part.
        steps, epochs: training steps taken, and the epochs they make.
        losses: the training loss of every step (summed over the batch).
        model: the trained network, as it was evaluated (:func:`save_fast94_model` writes it).
        settings: the :class:`Fast94Settings` of the run.
    """

    test_accuracy: float
    seconds: float
    whiten_seconds: float
    train_seconds: float
    eval_seconds: float
    steps: int
    epochs: float
    losses: list = field(repr=False, default_factory=list)
    model: object = field(repr=False, compare=False, default=None)
    settings: Fast94Settings | None = field(repr=False, default=None)

    @classmethod
    def from_clock(cls, test_accuracy: float, clock: tuple, per_epoch: int, losses: list, model=None,
                   settings=None) -> Fast94Result:  # fmt: skip
        """From the clock read at the start, after whitening, after training and at the end."""
        start, whitened, trained, end = clock
        return cls(test_accuracy, end - start, whitened - start, trained - whitened, end - trained,
                   len(losses), len(losses) / per_epoch, losses, model, settings)  # fmt: skip

    @property
    def diverged(self) -> str | None:
        """None, or what went wrong where the training loss became NaN or infinite (the step,
        the learning rate); the accuracy is then meaningless."""
        bad = next((i for i, value in enumerate(self.losses) if not math.isfinite(value)), None)
        if bad is None:
            return None
        lr = "" if self.settings is None else f" (learning rate {self.settings.learning_rate} per 1024 examples)"
        return (f"fast94: the training loss became {self.losses[bad]} at step {bad + 1} of {self.steps}{lr}: "
                "training diverged, and the accuracy is meaningless. Likely cause: a learning rate too large "
                "for these settings")  # fmt: skip

    def figures(self) -> dict:
        """The run's numbers (accuracy, seconds, steps, epochs), for a log or a report, and
        ``diverged`` where the run did."""
        names = ("test_accuracy", "seconds", "whiten_seconds", "train_seconds", "eval_seconds", "steps", "epochs")
        figures = {name: getattr(self, name) for name in names}
        if self.diverged:
            figures["diverged"] = self.diverged
        return figures


def sgd_hyper_parameters(settings: Fast94Settings) -> tuple[dict, dict]:
    """PyTorch-style Nesterov SGD settings, ``(others, batchnorm_biases)``, from the
    recipe's decoupled ones: the learning rate and decay are given per 1024 examples and
    divided by 1024·(1 + 1/(1 − momentum)), the decay multiplied by the batch size; the
    weight decay is then divided by each group's learning rate, since
    :func:`xpnet.optim.nesterov_sgd` (like PyTorch) scales it by the learning rate."""
    kilostep = 1024 * (1 + 1 / (1 - settings.momentum))
    lr = settings.learning_rate / kilostep
    decay = settings.weight_decay * settings.batch_size / kilostep
    bias_lr = lr * settings.bias_scaler
    others = {"learning_rate": lr, "momentum": settings.momentum, "weight_decay": decay / lr}
    biases = {"learning_rate": bias_lr, "momentum": settings.momentum, "weight_decay": decay / bias_lr}
    return others, biases


def warmup_decay(step: int, total: int, settings: Fast94Settings) -> float:
    """The learning-rate factor at ``step`` (0-based) of ``total``."""
    warmup_steps = int(total * settings.warmup)
    if step < warmup_steps:
        frac = step / warmup_steps
        return settings.start_factor * (1 - frac) + frac
    frac = (step - warmup_steps) / max(total - warmup_steps, 1)
    return (1 - frac) + settings.final_factor * frac


def normalized_images(backend: Backend, X, dtype="float32", name="images"):
    """Colour pixels (N, H, W, 3) or (N, 3, H, W), 0..255 (CIFAR-10's are 32x32), as normalised
    (N, 3, H, W) images on ``backend``'s device: moved once, then checked there (finite, in
    0..255, floats not scaled to [0, 1]) and scaled (``name``: what messages call them)."""
    X = X if is_array(X) else np.asarray(X)  # another library's array moves through backend.asarray
    if X.ndim != 4 or 3 not in (X.shape[1], X.shape[3]):
        raise ValueError(
            f"fast94: {name} must be colour images (N, H, W, 3) or (N, 3, H, W), as CIFAR-10's (N, 32, 32, 3); "
            f"got shape {tuple(X.shape)}"
        )
    xp = backend.xp
    images = backend.asarray(X) if not backend.owns(X) else X
    images = xp.astype(images, backend.dtype(dtype))
    if images.shape[1] != 3:
        images = xp.permute_dims(images, (0, 3, 1, 2))
    _check_pixels(backend, images, name, scaled_possible=not namespace(X).isdtype(X.dtype, "integral"))
    mean = backend.asarray(np.asarray(CIFAR10_MEAN) * 255, dtype=dtype)[:, None, None]
    std = backend.asarray(np.asarray(CIFAR10_STD) * 255, dtype=dtype)[:, None, None]
    return (images - mean) / std


def _check_pixels(backend: Backend, images, name: str, scaled_possible: bool) -> None:
    """ValueError unless ``images`` hold finite pixels in 0..255, not already normalised or
    (``scaled_possible``: given as floats) scaled to [0, 1]: either would be normalised again,
    and train on in silence. One transfer of their least and largest value, before anything is timed."""
    xp = backend.xp
    low, high = backend.to_floats([xp.min(images), xp.max(images)])
    if not (math.isfinite(low) and math.isfinite(high)):
        # NaN pixels surfaced as "Eigenvalues did not converge" from the whitening layer's eigh
        raise ValueError(f"fast94: {name} contains NaN or infinite values")
    if low < 0 or high > 255:
        raise ValueError(
            f"fast94: {name} must hold pixels in 0..255, which it normalises itself; got values from {low:.4g} "
            f"to {high:.4g} (pass the images as loaded, before any normalisation)"
        )
    if scaled_possible and 0 < high <= 1:
        raise ValueError(
            f"fast94: {name} looks scaled to [0, 1] (its largest value is {high:.4g}); it takes pixels 0..255, "
            f"as load_CIFAR10 gives them: multiply them by 255"
        )


class Fast94Trainer:
    """One run of the recipe's training on a :class:`~xpnet.cnn.FastConvNet`.

    Args:
        model: the network (its parameters are trained in place).
        images: (N, 3, H, W) normalised training images on the model's device; labels (N,).
        settings: :class:`Fast94Settings`.
        seed: the draws of the augmentations and of the batches.
    """

    def __init__(self, model: FastConvNet, images, labels, settings: Fast94Settings, seed=0):
        self.model, self.settings, self.seed = model, settings, seed
        self.backend = model.backend
        n = images.shape[0]
        if n < settings.batch_size:
            raise ValueError(f"fast94: batch_size {settings.batch_size} is larger than the {n} training images")
        check_reflect_pad("fast94", "translate", settings.translate, images)  # in the recipe's words
        self.labels = labels
        self.per_epoch = n // settings.batch_size
        self.total = math.ceil(self.per_epoch * settings.epochs)
        self.augmenter = AlternatingFlipTranslate(
            images, self.backend.rng((seed, 1)), settings.flip, settings.translate
        )
        self.sampler = EpochPermutation(n, settings.batch_size)
        others, biases = sgd_hyper_parameters(settings)
        schedule = lambda t: warmup_decay(t, self.total, settings)  # noqa: E731
        groups = [{"params": lambda name: name.startswith("beta"), **biases}]
        self.update = Update("nesterov_sgd", others, list(model.params), self.per_epoch, groups,
                             lr_schedule=schedule, on_device=True)  # fmt: skip
        self.update.start(self.backend, model.dtype, 0, self.total)
        averaged = [*model.params.values()] + [b[k] for b in model.bn_params for k in ("running_mean", "running_var")]
        every = settings.lookahead_every
        self.lookahead = Lookahead(averaged, self.total, every, cubic_lookahead_decay) if every else None
        capture = self.backend.can_capture if settings.cuda_graph is None else settings.cuda_graph
        self.graph = GraphReplay(self.backend) if capture else None
        # the lookahead's work, every few steps, as a graph of its own: the step's graph stays free of it
        self.lookahead_graph = GraphReplay(self.backend) if capture and self.lookahead is not None else None
        # One generator for every epoch's batch order: on CuPy each new generator initialises
        # its curand states (8·256 per multiprocessor), which the timed run would pay per epoch.
        self._order_rng = self.backend.rng((seed, 2))

    @property
    def epochs(self) -> int:
        """Epochs begun, the last one possibly cut short."""
        return math.ceil(self.total / self.per_epoch)

    @property
    def capture_key(self) -> tuple:
        """The device arrays a captured step reads, which stay the same for the whole run,
        and the model's graph key, whether the whitening bias trains: the step is captured
        once with it and once without."""
        return (self.augmenter.images, self.labels, *self.update.arrays, *self.model.graph_key)

    def _step(self):
        xp = self.backend.xp
        rows = self.sampler.indices(self._order_rng)
        X = xp.take(self.augmenter.images, rows, axis=0)
        loss, grads = self.model.loss(X, xp.take(self.labels, rows, axis=0))
        self.update.apply(self.model.params, grads)
        return loss

    def _lookahead(self):
        """Count a step for the lookahead and, at its points, move it (replayed from its graph)."""
        if self.lookahead is None or not self.lookahead.count():
            return
        if self.lookahead_graph is None:
            self.lookahead.move()
        else:
            self.lookahead_graph.run(self.lookahead.move, self.lookahead.arrays)

    def train(self, on_epoch=None) -> list:
        """All the steps; returns their losses as 0-d device arrays.

        ``on_epoch(epoch, trainer)`` runs before each epoch's first step, after its
        images and batch order are drawn (``trainer.augmenter``, ``trainer.sampler``);
        ``trainer.losses`` holds the losses of the steps so far.
        """
        losses: list = []
        self.losses = losses
        try:
            for epoch in range(self.epochs):
                self.model.train_whitening_bias = epoch < self.settings.whiten_bias_epochs
                self.augmenter.epoch(epoch)
                self.sampler.start_epoch(self._order_rng)
                if on_epoch is not None:
                    on_epoch(epoch, self)
                key = self.capture_key
                for _ in range(min(self.per_epoch, self.total - len(losses))):
                    losses.append(self._step() if self.graph is None else self.graph.run(self._step, key))
                    self._lookahead()
        finally:
            self.model.train_whitening_bias = True
        if self.lookahead is not None:
            self.lookahead.finish()
        return losses


def recipe_model(backend, settings: Fast94Settings, seed, input_dim) -> FastConvNet:
    """The recipe's network for inputs of ``input_dim`` (C, H, W), initialised from ``seed``
    (its whitening filters not yet set from the data)."""
    return FastConvNet(input_dim=input_dim, widths=settings.widths, scale=settings.scale,
                       num_classes=CIFAR10_CLASSES, bn_momentum=settings.bn_momentum, bn_eps=settings.bn_eps,
                       label_smoothing=settings.label_smoothing, loss_reduction="sum",
                       dtype=settings.dtype, activation_dtype=settings.activation_dtype,
                       backend=backend, rng=backend.rng((seed, 0)))  # fmt: skip


def fast94(data: dict, backend=None, seed=0, warmup: bool | None = None, verbose: bool = False, progress=None,
           **overrides):  # fmt: skip
    """Run the fast CIFAR-10 recipe and report the test accuracy and the timed seconds.

    Args:
        data: 'X_train', 'y_train', 'X_test', 'y_test' (pixels 0..255, (N, 32, 32, 3) as
            :func:`xpnet.data_utils.load_CIFAR10` returns them, or (N, 3, 32, 32)).
        backend: spec or Backend ("cupy" for the GPU).
        seed: the initial weights, augmentations and batches.
        warmup: first run the whole recipe once untimed on the same shapes (kernels
            compiled, graphs captured), as the published timing does; None: on a GPU.
        verbose: print the result.
        progress: called with a line of text as the timed run starts each epoch and its
            evaluation, e.g. ``print`` on a CPU, where the published settings take hours; off a
            GPU each line also gives the previous epoch's training loss per image (on a GPU the
            lines read the host clock only and wait for no device).
        **overrides: :class:`Fast94Settings` fields (widths, epochs, batch_size, ...).
    Returns:
        :class:`Fast94Result`.
    """
    _check_data_dict(data)  # first: fast94(backend, data) would otherwise be named by its backend
    settings = Fast94Settings().with_overrides(overrides)
    if as_int(seed) is None or seed < 0:  # checked before the data moves; NumPy's seeding would not name it
        raise ValueError(f"fast94: seed must be a non-negative integer, got {seed!r}")
    seed = as_int(seed)
    # a string is truthy: warmup="no" ran the recipe twice
    warmup, verbose = check_flag("fast94: warmup", warmup, nullable=True), check_flag("fast94: verbose", verbose)
    backend = get_backend(backend)
    arrays = device_data(backend, data, settings.dtype)
    if (warmup is None and backend.is_gpu) or warmup:
        timed_run(backend, settings, seed, *arrays)
    result = timed_run(backend, settings, seed, *arrays, progress=progress)
    if verbose:
        print(f"fast94: test accuracy {result.test_accuracy:.4f} in {result.seconds:.2f} s "
              f"({result.steps} steps, {result.epochs:.2f} epochs on {backend.device_name})")  # fmt: skip
    return result


def _check_data_dict(data) -> tuple:
    """The four keys of :func:`fast94`'s data, after checking that ``data`` is a dict that has
    them; a list of the four arrays failed inside NumPy ("truth value ... is ambiguous")."""
    keys = ("X_train", "y_train", "X_test", "y_test")
    if not isinstance(data, Mapping):
        raise TypeError(
            f"fast94: data must be a dict with 'X_train', 'y_train', 'X_test' and 'y_test', got {type(data).__name__}"
            "; load_CIFAR10's four arrays make one: dict(zip(('X_train', 'y_train', 'X_test', 'y_test'), arrays))"
        )
    for key in keys:
        if key not in data:
            raise ValueError(f"fast94: data needs 'X_train', 'y_train', 'X_test' and 'y_test'; {key!r} is missing")
    return keys


def device_data(backend: Backend, data: dict, dtype="float32") -> tuple[Array, Array, Array, Array]:
    """(train images, train labels, test images, test labels) on the device, the images
    normalised, from ``data`` as :func:`fast94` takes it (moved once)."""
    keys = _check_data_dict(data)
    arrays = {key: data[key] if is_array(data[key]) else np.asarray(data[key]) for key in keys}
    for split in ("train", "test"):  # as the Solver checks its data, wherever the arrays are (pixels below)
        validate_split(arrays, split, CIFAR10_CLASSES, check_finite=False, caller="fast94")
    train_images = normalized_images(backend, arrays["X_train"], dtype, "X_train")
    test_images = normalized_images(backend, arrays["X_test"], dtype, "X_test")
    train_labels, test_labels = (_labels(backend, arrays[key]) for key in ("y_train", "y_test"))
    return train_images, train_labels, test_images, test_labels


def save_fast94_model(path, result: Fast94Result) -> str:
    """Write the network that ``result``'s run trained to ``path`` (an xpnet ``.npz``
    checkpoint, written atomically and safe to load), with the settings that rebuild it
    and the run's figures. Returns the path."""
    if not isinstance(result, Fast94Result):  # a network alone failed on `result.model`
        if isinstance(path, Fast94Result):
            hint = "; the path comes first: save_fast94_model(path, result)"
        elif isinstance(result, FastConvNet):
            hint = (
                ": the result carries the settings that rebuild the network; a FastConvNet alone saves "
                "with save_checkpoint(path, model.state_dict())"
            )
        else:
            hint = ""
        raise TypeError(f"save_fast94_model: result must be what fast94 returned, got {type(result).__name__}{hint}")
    if not isinstance(result.model, FastConvNet) or result.settings is None:
        raise ValueError("save_fast94_model: the result holds no xpnet network (a run of PyTorch's side?)")
    model = result.model
    payload = {"recipe": "fast94", "settings": asdict(result.settings), "input_dim": list(model.input_dim),
               "model": model.state_dict(), "figures": result.figures()}  # fmt: skip
    return save_checkpoint(path, payload)


def load_fast94_model(path, backend=None) -> FastConvNet:
    """The network :func:`save_fast94_model` wrote, on ``backend``. It takes images
    normalised as the recipe's are (:func:`normalized_images` of the pixels): ``model.loss(X)``
    scores them with batchnorm on its running averages, :func:`~xpnet.augment.tta_scores`
    with the recipe's test-time augmentation. Files are read without unpickling anything;
    one that is not such a checkpoint raises :class:`~xpnet.checkpoint.CheckpointError`."""
    backend = get_backend(backend)
    path = file_path("load_fast94_model", "path", path)  # ~ expanded: the file's size is read below
    payload = load_checkpoint(path)
    if payload.get("recipe") != "fast94" or not isinstance(payload.get("settings"), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no fast94 network (save_fast94_model writes one)")
    try:
        settings = Fast94Settings().with_overrides(payload["settings"])
        input_dim = tuple(check_input_dim(payload.get("input_dim", ())))
        # The sizes come from the file, whose arrays must hold the network's values.
        with values_at_most(os.path.getsize(path) // np.dtype(settings.dtype).itemsize):
            model = recipe_model(backend, settings, 0, input_dim)
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from exc
    return model


def _labels(backend, y):
    """Labels that :func:`~xpnet.data_checks.validate_split` passed, on the device."""
    return y if backend.owns(y) else backend.asarray(y, dtype="int64")


def _epoch_report(progress, start):
    """An ``on_epoch`` for :meth:`Fast94Trainer.train` that tells ``progress`` each epoch's
    start and, off a GPU, the previous epoch's mean training loss per image (on a GPU, reading
    it would wait for the device inside the timed run)."""

    def report(epoch, trainer):
        text = f"fast94: epoch {epoch + 1} of {trainer.epochs}, {time.perf_counter() - start:.0f} s"
        last = trainer.losses[-trainer.per_epoch :]
        if last and not trainer.backend.is_gpu:
            per_image = sum(trainer.backend.to_floats(last)) / (len(last) * trainer.settings.batch_size)
            text += f"; training loss {per_image:.3f} per image in the epoch before"
        progress(text)

    return report


def timed_run(backend, settings: Fast94Settings, seed, train_images, train_labels, test_images, test_labels,
              progress=None):  # fmt: skip
    """One timed run on :func:`device_data`'s arrays: whitening, training, evaluation with TTA.
    ``progress(text)``, if given, hears of each epoch and of the evaluation as they start.
    Returns a :class:`Fast94Result`."""
    model = recipe_model(backend, settings, seed, tuple(train_images.shape[1:]))
    switches = (
        (settings.tf32, backend.set_tf32),
        (settings.cudnn, backend.set_cudnn),
        (settings.conv_autotune, backend.set_conv_autotune),
    )
    switched = []  # those switched on, and so to switch off again, even when a later one is refused
    try:
        for on, switch in switches:
            if on:
                switch(True)
                switched.append(switch)
        backend.sync()
        start = time.perf_counter()
        # clipped: the array API leaves a slice's stop past the end unspecified (array-api-strict refuses it)
        whitening_images = train_images[: min(settings.whiten_images, train_images.shape[0]), ...]
        model.init_whitening(whitening_images, settings.whiten_eps)
        backend.sync()
        whitened = time.perf_counter()
        trainer = Fast94Trainer(model, train_images, train_labels, settings, seed)
        losses = trainer.train(None if progress is None else _epoch_report(progress, start))
        backend.sync()
        trained = time.perf_counter()
        if progress is not None:
            progress(f"fast94: evaluating {test_images.shape[0]} test images (TTA level {settings.tta_level}), "
                     f"{trained - start:.0f} s")  # fmt: skip
        scores = tta_scores(model.loss, test_images, settings.tta_level)
        test_accuracy = backend.to_floats([accuracy(backend.xp.argmax(scores, axis=1), test_labels)])[0]
        end = time.perf_counter()
    finally:
        for switch in switched:
            switch(False)
    result = Fast94Result.from_clock(test_accuracy, (start, whitened, trained, end), trainer.per_epoch,
                                     backend.to_floats(losses), model, settings)  # fmt: skip
    if result.diverged:
        warnings.warn(result.diverged, DivergenceWarning, stacklevel=2)
    return result

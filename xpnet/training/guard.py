"""The finite-loss check: a device flag ANDed with ``isfinite(loss)`` at every step,
read only together with values that cross to the host anyway, and what to tell
the user when it turns false."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings

__all__ = ["DivergenceWarning", "FiniteGuard", "divergence_said_once"]


class DivergenceWarning(RuntimeWarning):
    """Training diverged: its loss or parameters became NaN or infinite. The message says
    where, with the learning rate and the likely cause."""


@contextlib.contextmanager
def divergence_said_once():
    """Silence, inside the block, what a diverging run makes the array library and xpnet
    warn ('overflow encountered in matmul', pointing into xpnet's layers; the
    :class:`DivergenceWarning`): for a command that reports the divergence itself, once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", category=DivergenceWarning)
        yield


class FiniteGuard:
    """Tracks whether every loss so far was finite, without synchronising per step."""

    def __init__(self, backend, iteration: int = 0):
        xp = backend.xp
        self.backend = backend
        self.flag = xp.ones((), dtype=xp.bool, device=backend.device)
        self.known_finite_until = iteration  # the last iteration the flag was read as true

    def observe(self, loss) -> None:
        """Device work only: in place, so a captured graph updates the same flag."""
        self.flag &= self.backend.xp.isfinite(loss)

    def flag_with(self, params: dict):
        """The flag ANDed with "every parameter is finite" (a 0-d device bool)."""
        xp = self.backend.xp
        flag = self.flag
        for w in params.values():
            flag = flag & xp.all(xp.isfinite(w))
        return flag

    def confirm(self, iteration: int) -> None:
        self.known_finite_until = iteration

    def diverged(self, solver) -> str:
        """Warn that ``solver`` diverged; returns the message (what, where, the likely cause)."""
        configs = list(solver.optim_configs.values())
        lr = configs[0].get("learning_rate") if configs else None
        hyper = {f"model.{k}": getattr(solver.model, k, None) for k in ("reg", "weight_scale", "std")}
        hyper.update({f"optim_config[{k!r}]": v for k, v in solver.optim_config.items()})
        text = self.message(solver.iteration, solver.num_iterations, solver.iterations_per_epoch, lr, hyper)
        warnings.warn(text, DivergenceWarning, stacklevel=4)
        return text

    def message(self, iteration, num_iterations, per_epoch, learning_rate, hyper_parameters: dict) -> str:
        """What happened, where, and the likely cause."""
        first, last = self.known_finite_until + 1, iteration
        where = f"at iteration {last}" if first >= last else f"between iterations {first} and {last}"
        epoch = (last - 1) // per_epoch + 1
        return (
            f"training diverged {where} of {num_iterations} (epoch {epoch}): the loss or the "
            f"parameters became NaN or infinite; learning rate {learning_rate}. "
            f"Likely cause: {self._likely_cause(learning_rate, hyper_parameters)}"
        )

    def _likely_cause(self, lr, hyper_parameters) -> str:
        for name, value in hyper_parameters.items():
            if isinstance(value, numbers.Real) and not math.isfinite(value):
                return f"a non-finite hyper-parameter, {name} = {value}."
        if self.known_finite_until == 0:
            return (
                "the very first steps are non-finite: check the hyper-parameters (weight scale, reg) "
                f"and the input scale, then try a smaller learning rate than {lr}."
            )
        return f"the learning rate {lr} is too large; try a smaller one."

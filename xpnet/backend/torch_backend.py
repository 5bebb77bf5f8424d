"""PyTorch tensors through array-api-compat: specs "torch", "torch:cpu",
"torch:cuda" and "torch:cuda:N"."""

from __future__ import annotations

from array_api_compat import is_torch_array

from .base import Backend, DeviceRNG, seed_to_int
from .cupy_backend import _parse_index
from .registry import import_library, register_backend


class TorchRNG(DeviceRNG):
    """``torch.Generator`` on the backend's device."""

    def __init__(self, backend, seed=None):
        self.backend, self.seed = backend, seed
        self._gen = backend.lib.Generator(device=backend.device)
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(seed_to_int(seed))

    def _draw_integers(self, low, high, shape):
        torch = self.backend.lib
        return torch.randint(low, high, shape, generator=self._gen, device=self.backend.device, dtype=torch.int64)

    def _draw_normal(self, shape, std, dtype):
        out = self.backend.lib.randn(shape, generator=self._gen, device=self.backend.device, dtype=dtype)
        return out * std if std != 1.0 else out

    def _draw_uniform(self, shape, dtype):
        return self.backend.lib.rand(shape, generator=self._gen, device=self.backend.device, dtype=dtype)

    def _draw_permutation(self, n):
        return self.backend.lib.randperm(n, generator=self._gen, device=self.backend.device)


class TorchBackend(Backend):
    rng_class = TorchRNG

    @property
    def is_gpu(self):
        return self.device.type == "cuda"

    def to_numpy(self, x):
        return x.detach().to("cpu", copy=True).numpy()  # .cpu() keeps a CPU tensor's memory

    @property
    def random_stream(self) -> str:
        return f"torch:{self.device.type}"  # the CPU and CUDA generators draw differently from one seed

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return self.lib.cuda.get_device_name(self.device)
        return super().device_name

    def set_tf32(self, enabled: bool) -> None:
        if self.device.type != "cuda":
            super().set_tf32(enabled)
            return
        enabled = self.switch("set_tf32", enabled)
        self.lib.backends.cuda.matmul.allow_tf32 = enabled
        self.lib.backends.cudnn.allow_tf32 = enabled

    def sync(self):
        if self.device.type == "cuda":
            self.lib.cuda.synchronize(self.device)


def make_torch(spec: str) -> Backend:
    torch = import_library("torch", "torch")
    import array_api_compat.torch as xp

    where = spec.partition(":")[2] or "cpu"
    if where == "cuda" or where.startswith("cuda:"):
        index = _parse_index(spec, where.partition(":")[2] or "0")
        if not torch.cuda.is_available():
            raise RuntimeError(f"backend {spec!r}: PyTorch sees no CUDA GPU")
        device = torch.device("cuda", index)
    elif where == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"unknown torch device {where!r} in {spec!r}: use cpu, cuda or cuda:N")
    return TorchBackend(f"torch:{device}", xp, device, torch)


register_backend(
    "torch",
    make_torch,
    is_torch_array,
    install_hint='PyTorch is not installed. Install it with: pip install torch (or pip install "xpnet[torch]")',
    spec_of=lambda x: f"torch:{x.device}",
    specs=("torch", "torch:cpu", "torch:cuda", "torch:cuda:N"),
)

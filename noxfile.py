"""Sessions: `nox -s tests lint` (CPU, what CI runs; lint is ruff and mypy), `nox -s oldest` (the
suite with the oldest NumPy and array API packages pyproject.toml admits), `nox -s pythons` (the
suite under Python 3.10 and 3.13), `nox -s gpu` (the suite on CuPy), `nox -s kernels` (every CUDA
kernel through NVRTC, without a GPU), `nox -s bench` (the training-step benchmark)."""

import re
import shutil
import subprocess

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


# PyTorch's CPU build, for the torch backend's tests and the parity tests against the same
# recipes written in PyTorch. Pinned: pip takes a local CPU wheel of this release where a
# wheelhouse provides one (a newer release would pull a CUDA build of several GB).
TORCH_CPU = "torch==2.13.0"


# The ruff that CI lints and formats with. Pinned: a new release may restyle code that did not
# change and fail CI on it; raise it in a commit of its own, with the tree reformatted.
RUFF = "ruff==0.17.6"


@nox.session
def tests(session):
    """The whole suite on the CPU backends: numpy, array_api_strict and its device1, and PyTorch's CPU."""
    session.install("-e", ".[test]", TORCH_CPU)
    session.run("pytest", *session.posargs)


# The mypy that CI type-checks with. Pinned for the same reason as ruff.
MYPY = "mypy==2.4.1"


@nox.session
def lint(session):
    """ruff (lint rules and formatting), then mypy on the package (its settings in pyproject.toml)."""
    session.install(RUFF, MYPY, "-e", ".")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


def _floors(*names: str) -> list:
    """``name==X`` for each name's lowest version that pyproject.toml admits (its ``>=X``)."""
    text = open("pyproject.toml").read()
    pins = []
    for name in names:
        match = re.search(rf'"{re.escape(name)}>=([0-9.]+)', text)
        if match is None:
            raise ValueError(f"pyproject.toml gives {name} no lower bound")
        pins.append(f"{name}=={match.group(1)}")
    return pins


@nox.session
def oldest(session):
    """The suite on NumPy and array-api-strict with the oldest NumPy, array-api-compat and
    array-api-strict that pyproject.toml admits: checks that its lower bounds are true."""
    session.install("-e", ".[test]")
    session.install(*_floors("numpy", "array-api-compat", "array-api-strict"))
    backends = "numpy,array_api_strict,array_api_strict:device1"
    session.run("pytest", *session.posargs, env={"XPNET_TEST_BACKENDS": backends})


# The oldest and the newest Python that pyproject.toml's classifiers claim; CI runs one between them.
PYTHONS = ["3.10", "3.13"]


@nox.session(python=PYTHONS)
def pythons(session):
    """The suite on NumPy and array-api-strict under each of PYTHONS, found on PATH as python3.10,
    python3.13 (a missing one is skipped): checks that pyproject's Python range is true."""
    session.install("-e", ".[test]")
    backends = "numpy,array_api_strict,array_api_strict:device1"
    session.run("pytest", *session.posargs, env={"XPNET_TEST_BACKENDS": backends})


def _gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@nox.session(venv_backend="none")
def gpu(session):
    """The suite on CuPy (and NumPy beside it), in the current environment, which must
    have CuPy for the installed CUDA (pip install -e ".[test,cuda12]" or ".[test,cuda13]")."""
    if not _gpu_present():
        session.skip("no NVIDIA GPU visible")
    session.run("pytest", "-m", "not slow", *session.posargs, env={"XPNET_TEST_BACKENDS": "cupy,numpy"})


# CuPy, NVRTC and the CUDA runtime's headers (cuda_fp16.h, which CuPy's float16 includes)
# for each CUDA major version.
CUDA_WHEELS = {
    "12": ("cupy-cuda12x", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12"),
    "13": ("cupy-cuda13x", "nvidia-cuda-nvrtc>=13,<14", "nvidia-cuda-runtime>=13,<14"),
}


@nox.session
@nox.parametrize("cuda", list(CUDA_WHEELS))
def kernels(session, cuda):
    """Compile every CUDA kernel with NVRTC for sm_90, no GPU needed (CuPy's bindings, the
    NVRTC wheel and the runtime's headers of CUDA 12 or 13, about 235 MB), float16 variants
    with CuPy's own float16 header, and each elementwise and reduction kernel a second time
    as CuPy's code generator writes it: catches what the C++ compiler of the CPU tests lets
    through. `nox -s "kernels(cuda='13')"` for one version."""
    session.install("-e", ".", *CUDA_WHEELS[cuda])
    session.run("python", "tests/cpu_kernels.py", "--nvrtc")


@nox.session(venv_backend="none")
def bench(session):
    """Training-step benchmark on the backend given after --, e.g. `nox -s bench -- --backend cupy`."""
    session.run("python", "scripts/bench.py", *session.posargs)

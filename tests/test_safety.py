"""Safe files and honest failures: no file runs code when read, non-finite training
stops, mistakes get errors in xpnet's words, and no work is lost."""

import copy
import importlib.util
import io
import json
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    deny_writing,
    sigint_as_at_a_terminal,
    small_data,
    small_model,
    to_np,
    write_fake_cifar,
    write_pickle_payload,
)

import xpnet
from xpnet import checkpoint, data_utils, layers
from xpnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xpnet.data_utils import DataError, get_CIFAR10_data, load_CIFAR_batch
from xpnet.solver import Solver

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_script_safety", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_cli(train, capsys, args):
    """(exit code, stdout, stderr) of train.py's main, whether it returns or exits."""
    try:
        code = train(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def trained_checkpoint(tmp_path, model=None, **options):
    settings = dict(update_rule="adam", batch_size=50, num_epochs=1, verbose=False, seed=0)
    settings.update(options)
    model = small_model("numpy") if model is None else model
    solver = Solver(model, small_data(), checkpoint_name=str(tmp_path / "run"), **settings)
    solver.train()
    return solver, tmp_path / "run_epoch_1.npz"


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_format_is_npz_with_a_json_member(tmp_path):
    solver, path = trained_checkpoint(tmp_path)
    with np.load(path, allow_pickle=False) as archive:
        members = set(archive.files)
        document = json.loads(archive["__xpnet__.json"].tobytes())
    assert document["format"] == "xpnet-checkpoint" and document["version"] == 2
    assert document["payload"]["settings"]["update_rule"] == "adam"
    assert document["payload"]["epoch"] == 1
    array_refs = document["payload"]["model"]["params"]["W1"]
    assert set(array_refs) == {"__array__"} and array_refs["__array__"] in members
    state = load_checkpoint(path)
    np.testing.assert_array_equal(state["best_params"]["W1"], solver.best_params["W1"])
    assert state["optim_configs"]["W1"]["t"] == 4 and isinstance(state["optim_configs"]["W1"]["m"], np.ndarray)


def test_checkpoint_round_trips_values():
    payload = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "nested": [{"x": 1, "y": None, "z": "text"}, (1.5, np.float64(2.5))],
        "nan": float("nan"),
        "t": np.asarray(7, dtype=np.int64),
    }
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(os.path.join(folder, "c.npz"), payload)
        back = load_checkpoint(path)
    np.testing.assert_array_equal(back["a"], payload["a"])
    assert back["a"].dtype == np.float32
    assert back["nested"] == [{"x": 1, "y": None, "z": "text"}, [1.5, 2.5]]
    assert math.isnan(back["nan"]) and int(back["t"]) == 7


def test_a_model_state_with_other_normalisation_layers_is_refused_whole():
    model = xpnet.FullyConnectedNet([5, 5], input_dim=4, normalization="batchnorm", dtype="float64", seed=0)
    model.loss(np.random.default_rng(0).standard_normal((6, 4)), np.arange(6) % 3)  # running averages exist
    before = {name: to_np(value).copy() for name, value in model.params.items()}
    tampered = model.state_dict()
    tampered["params"]["W1"] = np.zeros_like(tampered["params"]["W1"])
    tampered["buffers"][1]["momentun"] = 0.5  # the layer would refuse it later, far from the file
    with pytest.raises(ValueError, match="saved buffer 1 has unknown key\\(s\\) momentun"):
        model.load_state_dict(tampered)
    short = {**tampered, "buffers": model.state_dict()["buffers"][:1]}  # zip would have loaded one of two
    with pytest.raises(ValueError, match=r"the saved state has 1 buffers \(layer state\), the model 2"):
        model.load_state_dict(short)
    for name, value in model.params.items():  # nothing was half loaded
        np.testing.assert_array_equal(to_np(value), before[name])


def test_a_model_saved_alone_or_by_the_solver_loads_for_inference_on_another_backend(tmp_path):
    solver, path = trained_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "model.npz", solver.model.state_dict())
    X = small_data()["X_val"]
    expected = to_np(solver.model.predict(X))
    for state in (load_checkpoint(tmp_path / "model.npz"), load_checkpoint(path)["model"]):
        model = small_model("array_api_strict:device1")
        model.load_state_dict(state)
        np.testing.assert_array_equal(to_np(model.predict(X)), expected)
    # the whole Solver checkpoint, or something else, is named as not being a model's state
    with pytest.raises(
        ValueError, match=r"got \['best_buffers', 'best_params', .*\] \(a Solver checkpoint keeps it under 'model'"
    ):
        model.load_state_dict(load_checkpoint(path))
    with pytest.raises(ValueError, match=r"a dict with 'params' and 'buffers', as state_dict\(\) returns; got list$"):
        model.load_state_dict([])
    with pytest.raises(
        ValueError, match=r"got str \(a file is read first: load_state_dict\(load_checkpoint\(path\)\)\)$"
    ):
        model.load_state_dict(str(path))


def test_checkpoint_refuses_values_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="cannot hold a object: only NumPy arrays, numbers, strings and None$"):
        save_checkpoint(tmp_path / "c.npz", {"thing": object()})
    with pytest.raises(TypeError, match="numbers, not Python objects"):
        save_checkpoint(tmp_path / "c.npz", {"thing": np.array([object()])})
    # each of these failed without a word on what to save instead, or inside os.fspath
    model = small_model("numpy")
    with pytest.raises(TypeError, match=r"cannot hold a FullyConnectedNet: .*; save model\.state_dict\(\), and load"):
        save_checkpoint(tmp_path / "c.npz", model)
    strict = xpnet.get_backend("array_api_strict")
    with pytest.raises(TypeError, match=r"cannot hold a Array: .*; move it to the host first, backend\.to_numpy\(x\)"):
        save_checkpoint(tmp_path / "c.npz", {"w": strict.asarray(np.ones(2))})
    with pytest.raises(
        TypeError, match=r"^save_checkpoint: path must be a file path \(str or Path\), got dict; it takes"
    ):
        save_checkpoint({"w": np.ones(2)}, tmp_path / "c.npz")
    for read in (load_checkpoint, checkpoint.check_checkpoint_file):  # load_checkpoint(solver), say
        with pytest.raises(TypeError, match=rf"^{read.__name__}: path must be a file path \(str or Path\), got dict$"):
            read({"w": np.ones(2)})
    # an empty path: the message blamed the working folder, or said the file '' does not exist
    with pytest.raises(ValueError, match=r"^save_checkpoint: path is an empty string, not a path$"):
        save_checkpoint("", {"w": np.ones(2)})
    with pytest.raises(ValueError, match=r"^load_checkpoint: path is an empty string, not a path$"):
        load_checkpoint("")
    # a masked array was written without its mask and read back as plain data
    with pytest.raises(TypeError, match=r"cannot hold a masked array: its mask would be lost; save np\.ma\.getdata"):
        save_checkpoint(tmp_path / "c.npz", {"w": np.ma.array([1.0, 2.0], mask=[False, True])})
    assert not list(tmp_path.iterdir())


def test_numpy_scalars_that_json_cannot_hold_come_back_as_0d_arrays(tmp_path):
    """A datetime64 scalar failed in json ("Object of type date is not JSON serializable"), and
    so did a complex one; NumPy's numbers, bools and strings come back as Python's."""
    path = tmp_path / "c.npz"
    odd = [np.complex128(1 + 2j), np.datetime64("2020-01-01"), np.timedelta64(5, "s"), np.bytes_(b"ab")]
    save_checkpoint(path, {"odd": odd, "plain": [np.float32(1.5), np.int64(7), np.bool_(True), np.str_("x")]})
    back = load_checkpoint(path)
    for value, loaded in zip(odd, back["odd"]):
        assert isinstance(loaded, np.ndarray) and loaded.shape == () and loaded.dtype == value.dtype
        assert loaded[()] == value
    assert back["plain"] == [1.5, 7, True, "x"]
    assert [type(v) for v in back["plain"]] == [float, int, bool, str]


def test_pickle_checkpoint_cannot_run_code_through_any_entry_point(tmp_path, train, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "shared_epoch_3.npz"
    write_pickle_payload(bad, marker, protocol=4)
    with pytest.raises(CheckpointError, match="shared_epoch_3.npz.*old pickle format"):
        load_checkpoint(bad)
    solver = Solver(small_model("numpy"), small_data(), verbose=False)
    with pytest.raises(ValueError, match="shared_epoch_3.npz.*can run any code"):
        solver.resume(bad)
    code, _, err = run_cli(train, capsys, ["--epochs", "1", "--resume", str(bad)])
    assert code == 2 and "shared_epoch_3.npz" in err and "--trust-pickle" in err
    assert not marker.exists()


def test_pickled_object_array_inside_an_npz_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = __import__("helpers").MakeFolderWhenUnpickled(marker)
    meta = json.dumps({"format": "xpnet-checkpoint", "version": 2, "payload": {"w": {"__array__": "a0"}}})
    np.savez(bad, **{"__xpnet__.json": np.frombuffer(meta.encode(), np.uint8), "a0": payload}, allow_pickle=True)
    with pytest.raises(CheckpointError, match="evil.npz.*corrupt"):
        load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an .npz file"),
        (b"hello world", "not an .npz file"),
        (b"PK\x03\x04 truncated", "corrupt"),
    ],
)
def test_damaged_checkpoints_name_the_file(tmp_path, content, message):
    path = tmp_path / "damaged.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"damaged.npz.*{message}"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "field, value, words",
    [(8, b"\x61\x00", "has a compressed member"), (6, b"\x01\x00", "corrupt.*encrypted")],
    ids=["unknown-compression", "encrypted"],
)
def test_a_checkpoint_with_damaged_zip_headers_is_named(tmp_path, field, value, words):
    """Bytes of a zip header changed (the first member's compression method, or its flags now
    saying it is encrypted): zipfile raised NotImplementedError or RuntimeError for these."""
    path = tmp_path / "damaged.npz"
    save_checkpoint(path, {"w": np.ones(3)})
    raw = bytearray(path.read_bytes())
    local = raw.index(b"PK\x03\x04")  # the first member's local header; central header fields sit 2 bytes later
    central = raw.index(b"PK\x01\x02")
    raw[local + field : local + field + 2] = value
    raw[central + field + 2 : central + field + 4] = value
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"damaged.npz.*{words}"):
        load_checkpoint(path)


def test_a_checkpoint_member_declaring_more_than_it_holds_is_refused_before_any_allocation(tmp_path):
    """A .npy header of a few bytes can declare terabytes: NumPy then raised MemoryError (or
    allocated it) for a file of 600 bytes. A compressed member, which xpnet never writes, can
    expand to far more than the file, and is refused as well."""
    import io
    import zipfile

    from numpy.lib import format as npy_format

    meta = json.dumps(
        {"format": "xpnet-checkpoint", "version": checkpoint.VERSION, "payload": {"w": {"__array__": "a0"}}}
    )
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    meta_member = io.BytesIO()
    np.save(meta_member, np.frombuffer(meta.encode(), np.uint8))
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__xpnet__.json.npy", meta_member.getvalue())
        archive.writestr("a0.npy", header.getvalue() + bytes(64))
    assert path.stat().st_size < 1000
    with pytest.raises(CheckpointError, match=r"liar.npz.*'a0.npy' declares an array of shape \(1000000000000,\)"):
        load_checkpoint(path)
    np.savez_compressed(tmp_path / "squeezed.npz", **{"__xpnet__.json": np.frombuffer(meta.encode(), np.uint8),
                                                      "a0": np.zeros(10)})  # fmt: skip
    with pytest.raises(CheckpointError, match="squeezed.npz.*has a compressed member"):
        load_checkpoint(tmp_path / "squeezed.npz")


def _zip_of_npy(path, members: dict, compression) -> None:
    """An .npz written member by member with zipfile: ``members`` maps names to .npy bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def _npy_header(shape, descr="<f4") -> bytes:
    import io

    from numpy.lib import format as npy_format

    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def test_an_npz_whose_zip_directory_is_too_large_is_refused_before_zipfile_reads_it(tmp_path, monkeypatch):
    """zipfile reads the central directory whole and makes an object of several hundred bytes
    for each entry of about a hundred: a million members in 90 MB asked for about 1 GB."""
    from xpnet import npz_members

    path = tmp_path / "many.npz"
    np.savez(path, **{f"a{i}": np.zeros(2) for i in range(300)})
    npz_members.check_npz_members(path, "many")  # a directory of 16 KB: within the bound
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive:
        directory = size - archive.start_dir - 22  # what the end record says, with no comment
    monkeypatch.setattr(npz_members, "MAX_DIRECTORY_BYTES", directory - 1)
    monkeypatch.setattr(npz_members.zipfile, "ZipFile", lambda *a: pytest.fail("zipfile read the directory"))
    with pytest.raises(npz_members.UnsafeNpzError, match=f"^many has a zip directory of {directory} bytes"):
        npz_members.check_npz_members(path, "many")
    with pytest.raises(CheckpointError, match=f"many.npz' has a zip directory of {directory} bytes"):
        load_checkpoint(path)


def test_an_npz_member_whose_header_does_not_parse_is_refused_by_name(tmp_path):
    """A header with an unclosed bracket reached the user as tokenize's TokenError ("EOF in
    multi-line statement"), from inside NumPy's header filter: found by flipping bytes of a
    Solver checkpoint."""
    from xpnet.npz_members import UnsafeNpzError, check_npz_members

    saved = io.BytesIO()
    np.save(saved, np.zeros(3))
    good = saved.getvalue()
    broken = good.replace(b"(3,)", b"(3, ")
    assert len(broken) == len(good) and broken != good
    path = tmp_path / "broken.npz"
    _zip_of_npy(path, {"__xpnet__.json.npy": good, "a0.npy": broken}, zipfile.ZIP_STORED)
    with pytest.raises(UnsafeNpzError, match=r"^broken is corrupt: member 'a0.npy' has an unreadable header \("):
        check_npz_members(path, "broken")
    with pytest.raises(CheckpointError, match=r"broken.npz' is corrupt: member 'a0.npy' has an unreadable header"):
        load_checkpoint(path)


def test_an_npz_whose_headers_claim_more_than_the_file_can_hold_is_refused_by_name(tmp_path):
    """The checks every .npz from elsewhere passes before NumPy allocates (checkpoints and
    bench.py's --cifar-npz): a .npy header declaring 4 TB in 128 bytes, and a deflated member
    whose zip header claims 2 GB from a few hundred compressed bytes (NumPy allocated what the
    header declared before finding the data short)."""
    import zipfile

    from xpnet.npz_members import UnsafeNpzError, check_npz_members

    liar = tmp_path / "liar.npz"
    _zip_of_npy(liar, {"X.npy": _npy_header((10**6, 10**6))}, zipfile.ZIP_STORED)
    with pytest.raises(UnsafeNpzError, match=r"the subset is corrupt: member 'X.npy' declares an array of shape"):
        check_npz_members(liar, "the subset")

    claimed = 2 * 10**9
    inflated = tmp_path / "inflated.npz"
    _zip_of_npy(inflated, {"X.npy": _npy_header((claimed // 4,)) + bytes(4096)}, zipfile.ZIP_DEFLATED)
    raw = bytearray(inflated.read_bytes())
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    raw[local + 22 : local + 26] = raw[central + 24 : central + 28] = claimed.to_bytes(4, "little")
    inflated.write_bytes(bytes(raw))
    assert zipfile.ZipFile(inflated).getinfo("X.npy").file_size == claimed  # the lie is in place
    with pytest.raises(UnsafeNpzError, match=r"inflated.npz is corrupt: member 'X.npy' claims 2000000000 bytes"):
        check_npz_members(inflated, str(inflated))

    # What np.savez and np.savez_compressed write passes, and only stored members where compression is not read.
    np.savez(tmp_path / "plain.npz", X=np.zeros((3, 4)), y=np.arange(3))
    np.savez_compressed(tmp_path / "squeezed.npz", X=np.zeros((300, 400)))
    check_npz_members(tmp_path / "plain.npz", "plain", compressed=False)
    check_npz_members(tmp_path / "squeezed.npz", "squeezed")
    with pytest.raises(UnsafeNpzError, match="squeezed has a compressed member 'X.npy'"):
        check_npz_members(tmp_path / "squeezed.npz", "squeezed", compressed=False)
    bz2 = tmp_path / "bz2.npz"
    _zip_of_npy(bz2, {"X.npy": _npy_header((2,)) + bytes(8)}, zipfile.ZIP_BZIP2)
    with pytest.raises(UnsafeNpzError, match="only stored or deflated members are read"):
        check_npz_members(bz2, "bz2")


def _overlapping_members(count: int, kernel: int) -> bytes:
    """A zip of ``count`` stored .npy members whose bytes overlap: each member's data holds the
    local headers and data of the members after it, and its .npy header declares all of it as
    uint8, so the members together declare about ``count`` times ``kernel`` bytes."""
    import struct
    import zlib

    def local(name, crc, size):
        return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, size, size, len(name), 0) + name

    names = [f"a{i}.npy".encode() for i in range(count)]
    datas, headers, tail = [b""] * count, [b""] * count, bytes(kernel)
    for i in reversed(range(count)):  # member i: its .npy header, then all that follows it
        datas[i] = _npy_header((len(tail),), "|u1") + tail
        headers[i] = local(names[i], zlib.crc32(datas[i]), len(datas[i]))
        tail = headers[i] + datas[i]
    out, offset, directory = tail, 0, b""
    for i in range(count):
        size = len(datas[i])
        directory += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, zlib.crc32(datas[i]), size, size, len(names[i]),
            0, 0, 0, 0, 0, offset,
        ) + names[i]  # fmt: skip
        offset += len(headers[i]) + len(_npy_header((1,), "|u1"))
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), len(out), 0)
    return out + directory + end


def test_an_npz_whose_members_overlap_is_refused_before_numpy_reads_them(tmp_path):
    """Each member passed the per-member checks, and the 200 together declared 100 MB in a file of
    0.5 MB (a checkpoint that named them all loaded them all); more members, more gigabytes."""
    import zipfile

    from xpnet.npz_members import UnsafeNpzError, check_npz_members

    path = tmp_path / "overlap.npz"
    path.write_bytes(_overlapping_members(200, 500_000))
    declared = sum(info.file_size for info in zipfile.ZipFile(path).infolist())
    assert declared > 150 * path.stat().st_size  # the file is what it claims
    assert np.load(path)["a199"].nbytes == 500_000  # and NumPy reads it
    with pytest.raises(UnsafeNpzError, match=rf"overlap.npz is corrupt: its members' data add up to {declared} bytes"):
        check_npz_members(path, str(path), compressed=False)


@pytest.mark.parametrize(
    "payload, message",
    [
        ("[" * 100_000 + "]" * 100_000, "unreadable metadata"),  # past Python's recursion limit in json
        ("[" * 500 + "]" * 500, "more than 64 levels deep"),  # past xpnet's own limit
        ('{"__array__": [1]}', r"array \[1\] is missing"),  # an array name that is not a string
    ],
    ids=["json-recursion", "deep-lists", "unhashable-array-name"],
)
def test_crafted_checkpoint_metadata_is_refused_by_name(tmp_path, payload, message):
    """Metadata a checkpoint writer never makes raised RecursionError or TypeError while reading."""
    meta = f'{{"format": "xpnet-checkpoint", "version": {checkpoint.VERSION}, "payload": {{"a": {payload}}}}}'
    np.savez(tmp_path / "crafted.npz", **{"__xpnet__.json": np.frombuffer(meta.encode(), np.uint8)})
    with pytest.raises(CheckpointError, match=f"crafted.npz.*{message}"):
        load_checkpoint(tmp_path / "crafted.npz")


def test_a_payload_nested_deeper_than_a_checkpoint_reads_is_refused_on_writing(tmp_path):
    nested: list = [np.ones(2)]
    for _ in range(checkpoint.MAX_DEPTH - 2):  # with the payload dict, MAX_DEPTH levels in all
        nested = [nested]
    save_checkpoint(tmp_path / "deepest.npz", {"a": nested})
    np.testing.assert_array_equal(_innermost(load_checkpoint(tmp_path / "deepest.npz")["a"]), np.ones(2))
    with pytest.raises(ValueError, match="nest 64 levels deep at most"):
        save_checkpoint(tmp_path / "deeper.npz", {"a": [nested]})
    assert not (tmp_path / "deeper.npz").exists()


def _innermost(nested):
    while isinstance(nested, list):
        (nested,) = nested
    return nested


def test_npz_that_is_not_a_checkpoint_is_refused(tmp_path):
    np.savez(tmp_path / "plain.npz", x=np.ones(3))
    with pytest.raises(CheckpointError, match="plain.npz.*no __xpnet__.json"):
        load_checkpoint(tmp_path / "plain.npz")
    meta = json.dumps({"format": "xpnet-checkpoint", "version": 99, "payload": {}})
    np.savez(tmp_path / "future.npz", **{"__xpnet__.json": np.frombuffer(meta.encode(), np.uint8)})
    with pytest.raises(CheckpointError, match="future.npz.*version 99"):
        load_checkpoint(tmp_path / "future.npz")


@pytest.mark.parametrize(
    "meta, message",
    [
        (np.zeros(3, np.float32), "unreadable metadata .metadata is not a byte string"),
        (np.frombuffer(b"\xff\xfe{", np.uint8), "unreadable metadata"),  # not UTF-8
        (np.frombuffer(b'{"format": "pickle", "version": 2, "payload": {}}', np.uint8), "is not an xpnet checkpoint"),
        (np.frombuffer(b'["xpnet-checkpoint", 2]', np.uint8), "is not an xpnet checkpoint"),
        (np.frombuffer(b'{"format": "xpnet-checkpoint", "version": 2, "payload": [1]}', np.uint8), "is not an xpnet"),
    ],
    ids=["float-metadata", "not-utf8", "other-format", "metadata-a-list", "payload-a-list"],
)
def test_metadata_no_checkpoint_writer_makes_is_refused_by_name(tmp_path, meta, message):
    np.savez(tmp_path / "odd.npz", **{"__xpnet__.json": meta})
    with pytest.raises(CheckpointError, match=f"odd.npz.*{message}"):
        load_checkpoint(tmp_path / "odd.npz")


def test_trusted_pickles_that_are_damaged_or_not_checkpoints_are_refused_by_name(tmp_path):
    """trust_pickle=True runs the unpickling; what it yields is still checked."""
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"format": "xpnet-checkpoint-1", "epoch": 1})[:-5])
    with pytest.raises(CheckpointError, match="cut.pkl.*is corrupt or not an xpnet checkpoint"):
        load_checkpoint(tmp_path / "cut.pkl", trust_pickle=True)
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"epoch": 1}))
    with pytest.raises(CheckpointError, match="other.pkl.*is not an xpnet checkpoint"):
        load_checkpoint(tmp_path / "other.pkl", trust_pickle=True)


def test_only_true_trusts_a_pickle(tmp_path, monkeypatch):
    """A string is truthy: trust_pickle="no" unpickled the file, and ran what it carried."""
    ran = []
    monkeypatch.setattr(checkpoint, "_RAN_FROM_A_PICKLE", ran.append, raising=False)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_RunsOnLoad()))
    for refused, shown in (("no", "'no'"), ("False", "'False'"), (np.array([True]), r"array\(\[ True\]\)"), (2, "2")):
        with pytest.raises(ValueError, match=f"trust_pickle must be True or False, got {shown}"):
            load_checkpoint(path, trust_pickle=refused)
        with pytest.raises(ValueError, match="trust_pickle must be True or False"):
            checkpoint.check_checkpoint_file(path, trust_pickle=refused)
        solver = Solver(small_model("numpy"), small_data(), verbose=False)
        with pytest.raises(ValueError, match="trust_pickle must be True or False"):
            solver.resume(path, trust_pickle=refused)
    assert ran == []
    with pytest.raises(CheckpointError, match="is not an xpnet checkpoint"):
        load_checkpoint(path, trust_pickle=True)  # trusted: unpickled, and what it made is still checked
    assert ran == ["loaded"]


class _RunsOnLoad:
    """Unpickling it calls checkpoint._RAN_FROM_A_PICKLE("loaded"): a stand-in for any code."""

    def __reduce__(self):
        return (_call_ran, ("loaded",))


def _call_ran(word):
    return checkpoint._RAN_FROM_A_PICKLE(word)


def test_is_finite_tree_looks_into_lists_tuples_and_python_floats():
    assert checkpoint.is_finite_tree({"a": [np.ones(2), (1.0, 2)], "b": "text", "c": np.arange(3)})
    assert not checkpoint.is_finite_tree({"a": [np.ones(2), (1.0, float("nan"))]})
    assert not checkpoint.is_finite_tree({"a": (np.array([1.0, np.inf], np.float32),)})
    assert not checkpoint.is_finite_tree([{"lr": float("-inf")}])
    tree = {"a": [np.ones(2), (1.0, 2)], "b": {"c": np.array([0.0, np.nan]), "d": np.array([np.inf])}}
    assert checkpoint.non_finite_path(tree, "state") == "state.b.c"  # the first one, keys and indices joined
    assert checkpoint.non_finite_path([1.0, {"x": (0.5, float("nan"))}]) == "1.x.1"
    assert checkpoint.non_finite_path({"a": [np.ones(2)], "n": np.arange(3)}) is None


def test_checkpoint_keys_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="checkpoint keys must be strings, got 3"):
        save_checkpoint(tmp_path / "keys.npz", {"model": {3: np.ones(2)}})
    assert not (tmp_path / "keys.npz").exists()


def test_a_payload_that_could_not_be_read_back_is_not_written(tmp_path):
    """Saved, then refused by load_checkpoint: a payload that is not a dict ("not an xpnet
    checkpoint"), and a dict whose one key marks arrays in the file ("array 'x' is missing")."""
    with pytest.raises(TypeError, match="^save_checkpoint: payload must be a dict, got list$"):
        save_checkpoint(tmp_path / "list.npz", [1, 2])
    with pytest.raises(ValueError, match="^a checkpoint dict may not have '__array__' as its only key"):
        save_checkpoint(tmp_path / "marker.npz", {"notes": {"__array__": "x"}})
    assert not list(tmp_path.iterdir())
    save_checkpoint(tmp_path / "ok.npz", {"notes": {"__array__": "x", "more": 1}})  # not a marker: it reads back
    assert load_checkpoint(tmp_path / "ok.npz") == {"notes": {"__array__": "x", "more": 1}}


def test_old_pickle_checkpoints_load_only_with_explicit_trust(tmp_path, train, capsys):
    solver, path = trained_checkpoint(tmp_path)
    legacy = tmp_path / "old_epoch_1.pkl"
    with open(legacy, "wb") as f:
        pickle.dump({"format": "xpnet-checkpoint-1", **solver.checkpoint()}, f)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_checkpoint(legacy)
    state = load_checkpoint(legacy, trust_pickle=True)
    assert state["epoch"] == 1
    resumed = Solver(small_model("numpy"), small_data(), update_rule="adam", batch_size=50, verbose=False, seed=0)
    resumed.resume(legacy, trust_pickle=True)
    np.testing.assert_array_equal(resumed.model.params["W1"], solver.model.params["W1"])


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.npz", {"x": np.ones(2)})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


KILL_LOOP_WRITER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from xpnet.checkpoint import save_checkpoint
big = np.random.default_rng(0).standard_normal((1000, 1000))
i = 0
while True:
    i += 1
    save_checkpoint(f"{sys.argv[1]}/run_epoch_{i % 3}.npz", {"w": big, "i": i})
"""


def test_kill_9_loop_leaves_only_loadable_checkpoints_and_no_stale_temporaries(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", KILL_LOOP_WRITER, str(folder), str(ROOT)])
        time.sleep(0.6 + rng.uniform(0, 0.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        for path in folder.glob("*.npz"):
            state = load_checkpoint(path)
            assert state["w"].shape == (1000, 1000) and state["i"] >= 1
    assert list(folder.glob("*.npz"))
    # A temporary of a writer that is still running must survive a cleanup.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = folder / f".other.npz.tmp-{alive.pid}-abcd0123"
        live_tmp.write_bytes(b"being written")
        dead_tmp = folder / ".other.npz.tmp-999999999-abcd0123"
        dead_tmp.write_bytes(b"left by a killed writer")
        save_checkpoint(folder / "next.npz", {"x": np.ones(1)})
        leftovers = sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)
        assert leftovers == [live_tmp.name]
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- CIFAR-10 files
def fake_cifar_folder(folder):
    write_fake_cifar(folder)
    return folder


def test_pickle_payload_in_a_cifar_batch_cannot_run_through_any_entry_point(tmp_path, train, capsys, monkeypatch):
    folder = fake_cifar_folder(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    write_pickle_payload(folder / "data_batch_2", marker)
    with pytest.raises(DataError, match="data_batch_2.*posix.mkdir|data_batch_2.*os.mkdir"):
        load_CIFAR_batch(folder / "data_batch_2")
    with pytest.raises(DataError, match="data_batch_2.*refused"):
        get_CIFAR10_data(folder, num_training=50, num_validation=10, num_test=10)
    code, _, err = run_cli(train, capsys, ["--dataset", "cifar10", "--data-dir", str(folder), "--epochs", "1"])
    assert code == 2 and "data_batch_2" in err and "refused" in err
    assert not marker.exists()


def test_cifar_batches_of_numpy_1_and_2_and_protocol_2_load(tmp_path):
    folder = fake_cifar_folder(tmp_path)  # protocol 2: bytes through _codecs.encode
    X, y = load_CIFAR_batch(folder / "data_batch_1")
    assert X.shape == (20, 32, 32, 3)
    raw = (folder / "data_batch_1").read_bytes()
    assert b"_codecs" in raw and b"numpy._core.multiarray" in raw
    numpy1 = tmp_path / "numpy1_batch"
    numpy1.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 2 on NumPy 1's module name
        X1, y1 = load_CIFAR_batch(numpy1)
    np.testing.assert_array_equal(X1, X)
    np.testing.assert_array_equal(y1, y)


def test_absurdly_large_cifar_file_is_refused_before_reading(tmp_path, monkeypatch):
    folder = fake_cifar_folder(tmp_path)
    monkeypatch.setattr(data_utils, "MAX_BATCH_BYTES", 1000)
    with pytest.raises(DataError, match="data_batch_1.*far larger than a batch file"):
        load_CIFAR_batch(folder / "data_batch_1")


def test_cifar_batch_with_wrong_contents_is_named(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataError, match="data_batch_1.*no data and labels"):
        load_CIFAR_batch(path)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="data_batch_1.*integer pixels"):
        load_CIFAR_batch(path)


@pytest.mark.parametrize(
    "data, labels",
    [
        (np.zeros((2, 3072), np.uint8), [2**70, 1]),  # past int64: an OverflowError from NumPy before
        (np.zeros((2, 3072), np.uint8), [-(2**70), 1]),
        (np.zeros((2, 3072), np.uint8), np.array([2**63 + 5, 1], np.uint64)),
        (np.zeros((2, 3072), np.uint8), [10, 1]),
    ],
)
def test_cifar_batch_with_labels_outside_the_classes_is_named(tmp_path, data, labels):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_1.*labels outside 0..9"):
        load_CIFAR_batch(path)


@pytest.mark.parametrize("value", [256, 1000, -1])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_cifar_batch_with_wider_integer_pixels_outside_0_to_255_is_refused(tmp_path, value, dtype):
    """Loaded as they were before, these became pixels of 1000 (or, as uint8, wrapped to 232)."""
    path = tmp_path / "data_batch_1"
    pixels = np.full((2, 3072), 7, np.int64)
    pixels[1, 5] = value
    with open(path, "wb") as f:
        pickle.dump({b"data": pixels, b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(
        DataError, match=f"data_batch_1.*pixels from {min(value, 7)} to {max(value, 7)}, outside 0..255"
    ):
        load_CIFAR_batch(path, dtype=dtype)
    pixels[1, 5] = 255  # wider integers within 0..255 are pixels all the same
    with open(path, "wb") as f:
        pickle.dump({b"data": pixels.astype(np.uint16), b"labels": [0, 1]}, f, protocol=2)
    X, _ = load_CIFAR_batch(path, dtype=dtype)
    assert X.dtype == np.dtype(dtype) and X.max() == 255 and X.min() == 7


def test_cifar_batch_whose_labels_or_pixels_are_nested_lists_is_refused_before_numpy_expands_them(tmp_path):
    """Lists that share one inner list pickle to kilobytes and convert to gigabytes: 1,000 rows
    sharing a row of 1,000 labels each, 16 KB on disk, were read as labels of shape (4, 1000, 1000)."""
    path = tmp_path / "data_batch_1"
    pixels = np.zeros((4, 3072), np.uint8)
    shared_row = [0] * 1000
    for data, labels, words in [
        (pixels, [[shared_row] * 1000] * 4, "labels that are not a flat list"),
        (pixels, [[0, 1]] * 4, "labels that are not a flat list"),
        (pixels, np.zeros((4, 2), np.int64), "labels that are not a flat list"),
        (pixels, [0.0, 1.0, 2.0, 3.0], "labels that are not a flat list"),
        ([[0] * 3072] * 4, [0, 1, 2, 3], "pixels as a list, not an array"),
    ]:
        with open(path, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
        assert path.stat().st_size < 100_000
        with pytest.raises(DataError, match=f"data_batch_1.*{words}"):
            load_CIFAR_batch(path)
    for labels in ([0, 1, 2, 3], np.arange(4), [np.int64(v) for v in range(4)]):  # the forms a batch may take
        with open(path, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": labels}, f, protocol=2)
        np.testing.assert_array_equal(load_CIFAR_batch(path)[1], np.arange(4))


def _batch_file(path, data, labels=(0,), protocol=2):
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": list(labels)}, f, protocol=protocol)
    return path


class _Rebuilt:
    """Pickles as a call of NumPy's ``_reconstruct`` with the given arguments and state: the
    forms NumPy writes, with what a crafted file can put in them instead."""

    def __init__(self, shape, typecode, state=None):
        self.args, self.state = (np.ndarray, shape, typecode), state

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, self.args) if self.state is None else (_reconstruct, self.args, self.state)


class _DtypeWithFields:
    """Pickles as numpy.dtype('u1') given a state that adds fields to it."""

    def __reduce__(self):
        return (np.dtype, ("u1", False, True), (3, "|", None, ("a",), {"a": (np.dtype("u1"), 0)}, 1, 1, 0))


class _NdarrayCall:
    def __reduce__(self):
        return (np.ndarray, ((10**10,), np.dtype(object)))


@pytest.mark.parametrize(
    "data, message",
    [
        # NumPy allocated the declared shape before reading any data: a 200-byte file, 80 GB
        (_Rebuilt((10**10,), np.dtype(object)), "rebuilds an array without the state NumPy writes"),
        (_NdarrayCall(), "calls numpy.ndarray directly"),
        (
            _Rebuilt((0,), b"b", (1, (10**10,), np.dtype(np.uint8), False, b"\0" * 8)),
            r"declares an array of shape \(10000000000,\) \(10000000000 bytes\) in a file of",
        ),
        # NumPy 2.4's __setstate__ read past a list shorter than the shape (a crash, or stray objects)
        (_Rebuilt((0,), b"b", (1, (1000,), np.dtype(object), False, [None])), "declares the dtype 'O8'"),
        (_Rebuilt((0,), b"b", (1, (2,), np.dtype([("a", "u1")]), False, b"\0\0")), "declares the dtype 'V1'"),
        (_Rebuilt((0,), b"b", (1, (2,), _DtypeWithFields(), False, b"\0\0")), "'u1' with fields or a subarray"),
        (_Rebuilt((0,), b"b", (1, (2, 3), np.dtype(np.uint8), False, b"\0" * 10)), r"\(6 bytes\) in 10\."),
    ],
    ids=["declared-shape", "ndarray-call", "oversized-state", "object-dtype", "void", "fields", "short-data"],
)
def test_a_cifar_batch_cannot_make_numpy_allocate_or_read_what_its_bytes_do_not_hold(tmp_path, data, message):
    path = _batch_file(tmp_path / "data_batch_1", data)
    assert path.stat().st_size < 500
    with pytest.raises(DataError, match=f"data_batch_1.* {message}"):
        load_CIFAR_batch(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_every_form_numpy_pickles_a_batch_in_loads_as_pickle_would(tmp_path, protocol):
    """Arrays in C and Fortran order, big-endian labels and NumPy integers, in protocol 2 (bytes
    through _codecs.encode), 4 and 5 (NumPy's _frombuffer): rebuilt by plain_pickle without
    NumPy's own rebuilders, equal to what pickle.load gives."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    for data, labels in [
        (pixels, [1, 2, 3]),
        (np.asfortranarray(pixels), np.array([1, 2, 3], dtype=">i8")),
        (pixels.astype(np.int16), [np.int64(4), np.int64(5), np.int64(9)]),
    ]:
        path = _batch_file(tmp_path / "data_batch_1", data, labels, protocol)
        with open(path, "rb") as f:
            expected = pickle.load(f, encoding="bytes")
        X, y = load_CIFAR_batch(path, dtype="float32")
        np.testing.assert_array_equal(X, expected[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(y, np.asarray(expected[b"labels"], dtype=np.int64))
        assert X.flags.writeable and y.flags.writeable


@pytest.mark.parametrize(
    "raw, message",
    [
        # pickle allocates a bytearray as long as its 8-byte length field says, before reading it
        (b"\x80\x05\x96" + struct.pack("<Q", 2**60) + b".", "corrupt or not a CIFAR-10 python batch.*bytearray8"),
        (b"\x80\x02}q\x00X\x04\x00\x00\x00data" + b"T" + struct.pack("<i", 2**30) + b"s.", "corrupt.*string4"),
        (b"\x80\x02\x82\x01)\x81.", "uses the pickle opcode EXT1, which no data file needs"),
        (b"\x80\x02K\x01Q.", "uses the pickle opcode BINPERSID"),
        # _codecs.encode("x" * 9, "zlib_codec"): pickles write bytes through latin1 only
        (
            b"\x80\x02c_codecs\nencode\nX\t\x00\x00\x00xxxxxxxxxX\n\x00\x00\x00zlib_codec\x86R.",
            "encodes with 'zlib_codec'",
        ),
        # pickle grows its memo table to the index: one byte changed in a batch file asked for 4.6 GB
        (
            b"\x80\x02}r" + struct.pack("<I", 577_851_937) + b".",
            "stores a memo entry at index 577851937 after 2 opcodes",
        ),
    ],
    ids=["bytearray-length", "string-length", "extension-registry", "persistent-id", "codec", "memo-index"],
)
def test_a_cifar_batch_is_walked_before_pickle_builds_anything_from_it(tmp_path, raw, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=f"data_batch_1.*{message}"):
        load_CIFAR_batch(path)


def test_arrays_a_batch_shares_are_built_once_and_never_beyond_the_files_size():
    """pickle's memo lets a file name one array, one run of bytes or one string to encode any
    number of times: each rebuilt on its own, 1,000 references to 6 KB asked for 6 MB, and a
    longer list for gigabytes."""
    from xpnet.plain_pickle import UnsafePickleError, load_plain

    pixels = np.zeros((2, 3072), np.uint8)
    raw = pickle.dumps({b"data": pixels, b"again": [pixels] * 1000}, protocol=4)
    loaded = load_plain(io.BytesIO(raw), len(raw))
    assert all(a is loaded[b"data"] for a in loaded[b"again"])
    np.testing.assert_array_equal(loaded[b"data"], pixels)

    # _codecs.encode of one memoized string of 10,000 characters, 1,000 times: 10 MB from 18 KB
    text = b"X" + struct.pack("<I", 10_000) + b"x" * 10_000
    raw = (
        b"\x80\x02c_codecs\nencode\nq\x000"
        + text
        + b"q\x010X\x06\x00\x00\x00latin1q\x020]("
        + (b"h\x00h\x01h\x02\x86R" * 1000)
        + b"e."
    )
    assert len(pickle.loads(raw, encoding="bytes")) == 1000 and len(raw) < 20_000  # what pickle builds from it
    with pytest.raises(UnsafePickleError, match="encodes more bytes than the file holds"):
        load_plain(io.BytesIO(raw), len(raw))

    blob = bytes(6144)
    arrays = [_Rebuilt((0,), b"b", (1, (2, 3072), np.dtype(np.uint8), False, blob)) for _ in range(1000)]
    raw = pickle.dumps({b"data": arrays}, protocol=4)
    assert len(raw) < 100_000
    with pytest.raises(UnsafePickleError, match=f"rebuilds arrays of more bytes than the file holds \\({len(raw)}\\)"):
        load_plain(io.BytesIO(raw), len(raw))


def _python2_batch(pixels: np.ndarray, labels) -> bytes:
    """A CIFAR-10 batch as Python 2's cPickle wrote the official files (protocol 2: strings as
    BINSTRING, NumPy 1's module names, the dtype's typecode and byte order as strings)."""

    def text(b):
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def number(v):
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    rows, cols = pixels.shape
    out = b"\x80\x02}q\x00(" + text(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + number(0) + b"\x85" + text(b"b") + b"\x87R"
    out += b"(" + number(1) + b"M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", cols) + b"\x86"
    out += b"cnumpy\ndtype\n" + text(b"u1") + number(0) + number(1) + b"\x87R"
    out += b"(" + number(3) + text(b"|") + b"NNN" + number(-1) + number(-1) + number(0) + b"tb"
    out += b"\x89" + text(pixels.tobytes()) + b"tb" + text(b"labels") + b"]("
    return out + b"".join(number(int(v)) for v in labels) + b"eu."


def test_a_batch_as_python_2_wrote_the_official_files_loads_as_pickle_reads_it(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    path.write_bytes(_python2_batch(pixels, [7, 0, 9]))
    expected = pickle.loads(path.read_bytes(), encoding="bytes")
    np.testing.assert_array_equal(expected[b"data"], pixels)  # the hand-written pickle is what it claims
    X, y = load_CIFAR_batch(path, dtype="uint8")
    np.testing.assert_array_equal(X, pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, [7, 0, 9])


# ----------------------------------------------------------------------------- non-finite losses
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_non_finite_loss_between_logging_points_stops_without_a_nan_checkpoint(tmp_path):
    solver = Solver(
        small_model("numpy", weight_scale=1.0),
        small_data(),
        update_rule="sgd",
        optim_config={"learning_rate": 1e6},
        batch_size=10,
        num_epochs=5,
        print_every=1000,  # no loss is logged after the first iteration: only the flag can tell
        verbose=False,
        seed=0,
        checkpoint_name=str(tmp_path / "run"),
    )
    with pytest.warns(RuntimeWarning, match=r"diverged between iterations 2 and 20 of 100 \(epoch 1\)"):
        solver.train()
    assert solver.iteration == 20  # stopped at the first epoch end, not after 5 epochs
    assert "learning rate 1000000.0" in solver.diverged and "too large" in solver.diverged
    assert solver.last_checkpoint is None and not list(tmp_path.iterdir())
    assert all(math.isfinite(v) for v in solver.val_acc_history)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_divergence_names_a_non_finite_hyper_parameter():
    # xpnet's models check reg whenever it is set; a model of one's own may not
    with pytest.raises(ValueError, match="reg must be a finite number, got inf"):
        small_model("numpy").reg = float("inf")

    class OwnModel:
        def __init__(self, reg):
            self.net, self.reg = small_model("numpy"), reg
            self.params = self.net.params

        def loss(self, X, y=None):
            if y is None:
                return self.net.loss(X)
            loss, grads = self.net.loss(X, y)
            w = self.params["W1"]
            grads["W1"] = grads["W1"] + self.reg * w
            return loss + 0.5 * self.reg * np.sum(w * w), grads

    solver = Solver(OwnModel(float("inf")), small_data(), batch_size=20, num_epochs=1, verbose=False, seed=0)
    with pytest.warns(RuntimeWarning, match=r"at iteration 1 of 10 .*model.reg = inf"):
        solver.train()
    assert solver.iteration == 1


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_checkpoints_before_divergence_stay_finite(tmp_path):
    solver = Solver(
        small_model("numpy", weight_scale=1.0),
        small_data(),
        update_rule="sgd",
        batch_size=20,
        num_epochs=30,
        print_every=1000,
        verbose=False,
        seed=0,
        lr_schedule=lambda iteration: 1.0 if iteration < 30 else 1e30,  # blows up in epoch 4
        checkpoint_name=str(tmp_path / "run"),
    )
    with pytest.warns(RuntimeWarning, match=r"diverged between iterations 31 and 40 of 300 \(epoch 4\)"):
        solver.train()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["run_epoch_1.npz", "run_epoch_2.npz", "run_epoch_3.npz"]
    assert solver.last_checkpoint == str(tmp_path / "run_epoch_3.npz")
    for name in written:
        assert checkpoint.is_finite_tree(load_checkpoint(tmp_path / name)["model"]["params"])


@pytest.mark.filterwarnings(
    "ignore:overflow encountered", "ignore:invalid value encountered", "ignore:training diverged"
)
@pytest.mark.parametrize("quiet", [True, False])
def test_train_script_exits_non_zero_on_divergence_and_says_so_once(train, capsys, quiet, tmp_path):
    """It said so three times (the Solver's warning, its report, the command's own line), after
    NumPy's 'overflow encountered in matmul' warnings that point into xpnet's layers."""
    log = tmp_path / "run.jsonl"
    args = ["--update-rule", "sgd", "--lr", "1e8", "--epochs", "3", "--log", str(log)] + (["--quiet"] if quiet else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(train, capsys, args)
    assert code == 1
    said = (err if quiet else out).count("training diverged")
    assert said == 1 and (out + err).count("training diverged") == 1 and "learning rate" in (out + err)
    assert not [w for w in caught if "training diverged" in str(w.message) or "encountered" in str(w.message)]
    final = json.loads(log.read_text().splitlines()[-1])
    assert "test_acc" in final and final["diverged"].startswith("training diverged")


def test_a_diverging_recipe_exits_non_zero_says_so_once_and_keeps_no_model(train, capsys, tmp_path):
    """It exited 0 and printed the test accuracy as if the run were good, with NumPy's overflow
    warnings pointing into xpnet's layers and the recipe's own warning below them."""
    write_fake_cifar(tmp_path / "cifar", per_batch=20)
    args = ["--dataset", "cifar10", "--recipe", "fast94", "--data-dir", str(tmp_path / "cifar"), "--num-train", "64",
            "--batch-size", "32", "--epochs", "2", "--recipe-set", "widths=4,4,4", "--recipe-set", "learning_rate=1e30",
            "--checkpoint-dir", str(tmp_path / "runs"), "--log", str(tmp_path / "run.jsonl")]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(train, capsys, args)
    assert code == 1
    assert err.count("training diverged") == 1 and "training diverged" not in out
    assert "the training loss became nan at step" in err and "learning rate 1e+30 per 1024 examples" in err
    assert not [w for w in caught if "diverged" in str(w.message) or "encountered" in str(w.message)]
    assert not (tmp_path / "runs" / "fast94.npz").exists()
    assert "training diverged" in json.loads((tmp_path / "run.jsonl").read_text())["diverged"]


# ----------------------------------------------------------------------------- the command line fails early
@pytest.mark.parametrize(
    "args, message",
    [
        (["--plot", "/nonexistent-folder/curves.png"], "--plot /nonexistent-folder/curves.png: folder"),
        # trained, then ended in matplotlib's "Format 'txt' is not supported" traceback
        (
            ["--plot", "{tmp}/curves.txt"],
            "--plot: matplotlib cannot save a figure as .txt; end the file name in one of ",
        ),
        (["--log", "{tmp}"], "is a folder, not a file"),
        # as root, renamed a plain file over the pipe (or over /dev/stdout)
        (["--plot", "{tmp}/pipe"], "--plot {tmp}/pipe: is not a regular file (a pipe or a device)"),
        # as open() refuses it; the rename replaced it
        (["--plot", "{tmp}/kept.png"], "--plot {tmp}/kept.png: is not writable"),
        (["--checkpoint-dir", "{tmp}/file/sub"], "--checkpoint-dir"),
        (["--checkpoint-dir", "{tmp}/pipe"], "--checkpoint-dir {tmp}/pipe: is a pipe, not a folder"),
        (["--dataset", "cifar10", "--recipe", "fast94", "--checkpoint-dir", "{tmp}/file/sub"], "cannot write there"),
        (
            ["--dataset", "cifar10", "--recipe", "fast94", "--checkpoint-dir", "{tmp}/kept"],
            "{tmp}/kept/fast94.npz: is not",
        ),
        # an unset shell variable: trained without checkpoints, or ended after training
        (["--checkpoint-dir", ""], "argument --checkpoint-dir: an empty path (an unset shell variable?)"),
        (["--log", ""], "argument --log: an empty path"),
        # learning_rate's own check named it only after the data set was loaded
        (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
        (["--reg", "inf"], "argument --reg: must be a finite number >= 0, got inf"),
        (["--num-train", "100"], "--num-train applies to --dataset cifar10 only"),
        (["--data-dir", "/tmp"], "--data-dir applies to --dataset cifar10 only"),
        (["--backend", "numpy:gpu"], "NumPy runs on the CPU only"),
    ],
)
def test_bad_outputs_and_flags_fail_before_loading_data(train, capsys, monkeypatch, tmp_path, args, message):
    (tmp_path / "file").write_text("a file, not a folder")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "kept.png").write_bytes(b"a picture made read-only")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "fast94.npz").write_bytes(b"a model made read-only")
    deny_writing(monkeypatch, tmp_path / "kept.png", tmp_path / "kept" / "fast94.npz")
    args, message = [a.replace("{tmp}", str(tmp_path)) for a in args], message.replace("{tmp}", str(tmp_path))

    def no_loading(*a, **k):
        raise AssertionError("data was loaded before the outputs were checked")

    monkeypatch.setattr(data_utils, "load_digits_data", no_loading)
    monkeypatch.setattr(data_utils, "find_CIFAR10", no_loading)
    code, _, err = run_cli(train, capsys, args)
    assert code == 2
    assert message in err


def test_plot_without_matplotlib_is_refused_before_training(train, capsys, monkeypatch, tmp_path):
    """--plot ran the whole training and then ended in an ImportError traceback."""
    import sys

    from xpnet import vis_utils

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    vis_utils._figure_class.cache_clear()
    monkeypatch.setattr(data_utils, "load_digits_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    try:
        code, _, err = run_cli(train, capsys, ["--plot", str(tmp_path / "curves.png")])
    finally:
        vis_utils._figure_class.cache_clear()
    assert code == 2
    assert '--plot: plotting needs matplotlib: pip install "xpnet[plot]"' in err


@pytest.mark.parametrize("name", ["curves.png", "curves.PDF", "curves.svg", "curves"])
def test_plot_files_that_matplotlib_writes_are_taken(name):
    from xpnet.vis_utils import plotting_unavailable

    assert plotting_unavailable(name) is None
    assert ".png, " in plotting_unavailable("curves.txt") and ".pdf" in plotting_unavailable("curves.txt")


def test_disk_error_during_training_names_path_and_last_checkpoint(train, capsys, tmp_path, monkeypatch):
    original = np.savez
    calls = []

    def disk_full_on_second_write(f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(f, *args, **kwargs)

    monkeypatch.setattr(np, "savez", disk_full_on_second_write)
    ckpt = tmp_path / "ck"
    code, _, err = run_cli(train, capsys, ["--epochs", "3", "--quiet", "--checkpoint-dir", str(ckpt)])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "No space left on device" in lines[0]
    assert str(ckpt / "digits_fc_epoch_2.npz") in lines[0]
    assert f"last good checkpoint: {ckpt / 'digits_fc_epoch_1.npz'}" in lines[0]
    assert sorted(p.name for p in ckpt.iterdir()) == ["digits_fc_epoch_1.npz"]


def test_a_checkpoint_name_that_can_never_be_written_is_refused_before_training(tmp_path):
    """A file where the name needs a folder: the Solver trained a whole epoch and then failed
    with "File exists". It is refused when the Solver is made; missing folders are still made."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(ValueError, match=r"checkpoint_name .*notes.txt/run.*notes.txt is a file, not a folder"):
        Solver(small_model("numpy"), small_data(), checkpoint_name=str(tmp_path / "notes.txt" / "run"))
    with pytest.raises(
        checkpoint.CheckpointWriteError, match=r"could not write .*: .*notes.txt is a file, not a folder"
    ):
        save_checkpoint(tmp_path / "notes.txt" / "deeper" / "x.npz", {"w": np.ones(2)})
    assert "notes.txt is a file, not a folder" in checkpoint.unwritable_reason(tmp_path / "notes.txt" / "x.npz")
    os.mkfifo(tmp_path / "pipe")  # named as what it is, not as a file
    assert checkpoint.unwritable_reason(tmp_path / "pipe" / "x.npz") == f"{tmp_path / 'pipe'} is a pipe, not a folder"
    fresh = tmp_path / "new" / "folders" / "run"
    solver = Solver(small_model("numpy"), small_data(), checkpoint_name=str(fresh), num_epochs=1, verbose=False)
    solver.train()
    assert solver.last_checkpoint == f"{fresh}_epoch_1.npz" and os.path.isfile(solver.last_checkpoint)


def test_a_read_only_checkpoint_is_kept_and_a_run_that_would_replace_it_stops_before_training(tmp_path, monkeypatch):
    """The rename replaced a checkpoint made read-only to keep it, where open() refuses it; a
    Solver that would reach its epoch trained up to there and then failed, or replaced it."""
    kept = tmp_path / "run_epoch_2.npz"
    save_checkpoint(kept, {"w": np.ones(2)})
    old = kept.read_bytes()
    kept.chmod(0o444)
    deny_writing(monkeypatch, kept)
    assert checkpoint.unwritable_reason(kept) == f"{os.path.realpath(kept)} is read-only"
    with pytest.raises(
        checkpoint.CheckpointWriteError, match=r"could not write checkpoint .*run_epoch_2.npz: .* read-only"
    ):
        save_checkpoint(kept, {"w": np.zeros(2)})
    run = str(tmp_path / "run")
    solver = Solver(
        small_model("numpy"), small_data(), checkpoint_name=run, num_epochs=2, verbose=False, progress=False
    )
    with pytest.raises(
        ValueError,
        match=r"checkpoint_name .*run': checkpoints cannot be written there \(.*run_epoch_2.npz is read-only\)",
    ):
        solver.train()
    assert solver.iteration == 0 and not (tmp_path / "run_epoch_1.npz").exists() and kept.read_bytes() == old
    solver.num_epochs = 1  # a run that ends before that epoch goes ahead
    solver.train()
    assert solver.last_checkpoint == f"{run}_epoch_1.npz" and kept.read_bytes() == old
    (tmp_path / "other_epoch_1.npz").mkdir()  # the rename failed on it, after the epoch
    other = Solver(small_model("numpy"), small_data(), checkpoint_name=str(tmp_path / "other"), num_epochs=1)
    with pytest.raises(ValueError, match=r"other_epoch_1.npz is a folder, not a file"):
        other.train()
    assert other.iteration == 0


def test_unwritable_reason_looks_where_a_tilde_path_points(tmp_path, monkeypatch):
    """It looked for a folder named "~" in the working folder, which save_checkpoint never writes to."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    monkeypatch.setenv("HOME", str(tmp_path / "notes.txt"))
    monkeypatch.chdir(tmp_path)
    assert "notes.txt is a file, not a folder" in checkpoint.unwritable_reason("~/run.npz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_checkpoint_name_in_a_read_only_folder_is_refused_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=r"locked is not writable"):
        Solver(small_model("numpy"), small_data(), checkpoint_name=str(locked / "sub" / "run"))


def test_ctrl_c_ends_cleanly_with_exit_130_and_a_loadable_checkpoint(tmp_path):
    ckpt = tmp_path / "ck"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--epochs", "100000", "--checkpoint-dir", str(ckpt), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=sigint_as_at_a_terminal,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(ckpt.glob("*.npz"))) < 2:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:  # a run of 100,000 epochs that missed the signal would outlive the suite
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted at epoch" in err and "iteration" in err
    last = err.split("last good checkpoint: ")[1].strip()
    state = load_checkpoint(last)
    assert state["epoch"] >= 2
    assert not [p for p in ckpt.iterdir() if ".tmp-" in p.name]
    for path in ckpt.iterdir():
        load_checkpoint(path)


# ----------------------------------------------------------------------------- resume
def _set(path: tuple, value):
    """A change to a checkpoint's payload: the entry at ``path`` (keys) set to ``value``."""

    def change(state):
        for key in path[:-1]:
            state = state[key]
        state[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_set(("epoch",), "abc"), "has epoch = 'abc', not a count"),
        (_set(("iteration",), -3), "has iteration = -3, not a count"),
        (_set(("loss_history",), [{"a": 1}]), "loss_history that is not a list of numbers"),
        (_set(("best_val_acc",), "high"), "best_val_acc = 'high', not an accuracy"),
        (_set(("settings",), None), "no settings naming its update_rule and batch_size"),
        (
            _set(("settings", "update_rule"), {}),
            r"was trained with update_rule=\{\}; this Solver has update_rule='adam'",
        ),
        (_set(("optim_configs",), [1, 2]), "optimizer state for a list; the model's parameters are"),
        (lambda state: state["optim_configs"].pop("W1"), "optimizer state for .*; the model's parameters are"),
        (_set(("optim_configs", "W1", "m"), np.ones(3)), r"optimizer state W1.m, an array of floats of shape \(3,\)"),
        (_set(("optim_configs", "W1", "v"), np.ones((6, 16), np.int64)), "optimizer state W1.v, int64 array of shape"),
        (
            _set(("optim_configs", "W1", "learning_rate"), "x"),
            "optimizer state W1.learning_rate = 'x', not a number or an array",
        ),
        # Adam's step count: -3 made its bias correction NaN, 2.5 was truncated, 2**70 steps cannot have run
        (_set(("optim_configs", "W1", "t"), "x"), "optimizer state W1.t = 'x', not a step count"),
        (_set(("optim_configs", "W1", "t"), -3), "optimizer state W1.t = -3, not a step count"),
        (_set(("optim_configs", "W1", "t"), 2.5), "optimizer state W1.t = 2.5, not a step count"),
        (_set(("optim_configs", "W1", "t"), 2**63 - 1), "optimizer state W1.t = 9223372036854775807, not a step count"),
        (_set(("optim_configs", "W1", "t"), np.array(2.0)), r"optimizer state W1.t = array\(2.\), not a step count"),
        # a number where Adam keeps a moment passed, and failed at the first step; a negative second
        # moment became NaN at its square root, and training diverged at once
        (_set(("optim_configs", "W1", "m"), 1), r"optimizer state W1.m = 1, not an array of shape \(6, 16\)"),
        (_set(("optim_configs", "W1", "m"), np.array(1.0)), r"optimizer state W1.m, an array of floats of shape \(\)"),
        (_set(("optim_configs", "b2", "v"), -np.ones(16)), "optimizer state b2.v below 0, where adam averages squared"),
        (_set(("epoch",), 2**70), r"has epoch = 1180591620717411303424 after \d+ iterations"),
        # NaN weights, moments or running averages: training diverged at once, and said so as if it were the cause
        (_set(("model", "params", "W1"), np.full((6, 16), np.nan)), r"NaN or infinite values in model.params.W1,"),
        (_set(("optim_configs", "b1", "v"), np.full(16, np.inf)), "NaN or infinite values in optim_configs.b1.v,"),
        (_set(("best_params", "W2"), np.full((16, 16), -np.inf)), "NaN or infinite values in best_params.W2,"),
        (_set(("model", "buffers", 0, "running_var"), np.full(16, np.nan)), "in model.buffers.0.running_var,"),
        (
            _set(("best_params", "W1"), np.ones(3)),
            r"best W1 of shape \(3,\); the model's W1 is an array of floats of shape",
        ),
        (
            _set(("best_params", "W1"), np.ones((6, 16), np.int64)),
            "best W1 int64 array; the model's W1 is an array of floats",
        ),
        (_set(("model", "params", "W1"), np.ones((6, 16), np.int64)), "saved parameter W1 is not an array of floats"),
        (_set(("model", "buffers"), ["x", "y"]), "saved buffer 0 is a str"),
        # the running averages kept with the best parameters
        (
            _set(("best_buffers", 1, "running_mean"), np.zeros(3)),
            r"best_buffers that do not fit the model: saved buffer 1's running_mean \(3,\) and running_var",
        ),
        (
            _set(("best_buffers", 1), {"running_mean": np.zeros(3), "running_var": np.ones(3)}),
            r"has best_buffers.1.running_mean of shape \(3,\), but model.buffers.1.running_mean has \(16,\)",
        ),
        (_set(("best_buffers",), "x"), "has best_buffers that are a str, not a list of layer state"),
        (_set(("best_buffers", 0, "running_var"), np.full(16, np.nan)), "in best_buffers.0.running_var,"),
        (lambda state: state.pop("model"), "is not a Solver checkpoint"),
    ],
)
def test_a_solver_checkpoint_that_no_solver_wrote_is_refused_whole(tmp_path, change, message):
    """Each part of a Solver checkpoint is checked before anything is restored: these raised
    TypeError, AttributeError or a broadcasting error from deep inside, some after the model's
    parameters had already been replaced."""
    _, path = trained_checkpoint(tmp_path, model=small_model("numpy", normalization="batchnorm"))
    state = load_checkpoint(path)
    change(state)
    save_checkpoint(tmp_path / "altered.npz", state)
    solver = Solver(small_model("numpy", normalization="batchnorm"), small_data(), update_rule="adam", batch_size=50,
                    verbose=False)  # fmt: skip
    before = {k: to_np(v) for k, v in solver.model.params.items()}
    with pytest.raises(ValueError, match=f"altered.npz.* {message}"):
        solver.resume(tmp_path / "altered.npz")
    assert solver.epoch == 0 and solver.loss_history == []
    for key, value in before.items():
        np.testing.assert_array_equal(to_np(solver.model.params[key]), value)


def test_a_checkpoint_written_before_best_buffers_resumes_with_the_best_parameters_alone(tmp_path):
    solver, path = trained_checkpoint(tmp_path, model=small_model("numpy", normalization="batchnorm"))
    state = load_checkpoint(path)
    del state["best_buffers"], state["rng"]
    save_checkpoint(tmp_path / "older.npz", state)
    resumed = Solver(small_model("numpy", normalization="batchnorm"), small_data(), update_rule="adam", batch_size=50,
                     num_epochs=2, verbose=False, seed=0)  # fmt: skip
    resumed.resume(tmp_path / "older.npz")
    assert resumed.best_buffers == [] and resumed.epoch == 1
    resumed.train()
    assert resumed.epoch == 2


def test_resume_refuses_another_update_rule(tmp_path):
    _, path = trained_checkpoint(tmp_path)
    other = Solver(small_model("numpy"), small_data(), update_rule="sgd_momentum", batch_size=50, verbose=False)
    with pytest.raises(ValueError, match="update_rule='adam'.*update_rule='sgd_momentum'"):
        other.resume(path)


def test_resume_with_the_same_settings_changes_nothing(tmp_path):
    _, path = trained_checkpoint(tmp_path, optim_config={"learning_rate": 1e-2}, lr_decay=0.5)
    same = Solver(
        small_model("numpy"),
        small_data(),
        update_rule="adam",
        optim_config={"learning_rate": 1e-2},
        lr_decay=0.5,
        batch_size=50,
        num_epochs=1,
        verbose=False,
        seed=0,
    )
    same.resume(path)
    assert same.resume_changes == []
    assert same.optim_configs["W1"]["learning_rate"] == pytest.approx(1e-2 * 0.5)


def test_train_after_the_last_epoch_says_that_there_is_nothing_to_train(tmp_path):
    """A Solver resumed at num_epochs (or a finished one trained again) returned at once, silently."""
    import warnings

    solver, path = trained_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match=r"nothing to train: this Solver has run 1 epochs of num_epochs=1"):
        solver.train()
    resumed = Solver(small_model("numpy"), small_data(), update_rule="adam", batch_size=50, num_epochs=1,
                     verbose=False, seed=0)  # fmt: skip
    resumed.resume(path)
    with pytest.warns(UserWarning, match="raise num_epochs to train on"):
        resumed.train()
    resumed.num_epochs = 2  # and training on says nothing of the kind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.train()
    assert resumed.epoch == 2


def test_resume_on_another_generator_says_that_the_draws_differ(tmp_path, capsys):
    """A NumPy run resumed on PyTorch cannot repeat the uninterrupted run: the resume says so."""
    pytest.importorskip("torch")
    _, path = trained_checkpoint(tmp_path)
    options = dict(update_rule="adam", batch_size=50, num_epochs=1)
    moved = Solver(small_model("torch:cpu"), small_data(), seed=0, **options)
    moved.resume(path)
    note = (
        "random draws by the torch:cpu generator (the checkpoint's run used numpy's): minibatches, "
        "dropout masks and accuracy subsamples differ from an uninterrupted run from here on"
    )
    assert moved.resume_changes == [note] and f"resume: {note}" in capsys.readouterr().out
    # the same generator (array-api-strict draws with NumPy's), or no seed to repeat: nothing to say
    for spec, seed in (("array_api_strict:device1", 0), ("torch:cpu", None)):
        quiet = Solver(small_model(spec), small_data(), seed=seed, verbose=False, **options)
        quiet.resume(path)
        assert quiet.resume_changes == ([] if seed == 0 else ["seed = None (the checkpoint has 0)"])


def test_resume_settings_passed_win_and_every_difference_is_printed(tmp_path, capsys):
    _, path = trained_checkpoint(tmp_path, optim_config={"learning_rate": 1e-2}, lr_decay=0.5)
    changed = Solver(
        small_model("numpy"),
        small_data(),
        update_rule="adam",
        optim_config={"learning_rate": 4e-3, "beta1": 0.8},
        lr_decay=0.9,
        batch_size=50,
        num_epochs=3,
        seed=5,
    )
    changed.resume(path)
    out = capsys.readouterr().out
    for text in (
        "lr_decay = 0.9 (the checkpoint has 0.5)",
        "num_epochs = 3 (the checkpoint has 1)",
        "seed = 5 (the checkpoint has 0)",
        "optim_config['learning_rate'] = 0.004 (the checkpoint has 0.01)",
        "optim_config['beta1'] = 0.8 (the checkpoint has None)",
        "learning rate at epoch 1: 0.0036",
    ):
        assert f"resume: {text}" in out
    assert len(changed.resume_changes) == 6
    for config in changed.optim_configs.values():
        assert config["learning_rate"] == pytest.approx(4e-3 * 0.9) and config["beta1"] == 0.8
    assert changed.seed == 5
    changed.train()
    assert changed.epoch == 3


# ----------------------------------------------------------------------------- refusals by name
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(optim_config={"learning_rat": 0.1}), "unknown optim_config key 'learning_rat' for update rule 'sgd'"),
        (dict(update_rule="adam", optim_config={"momentum": 0.9}), "'momentum' for update rule 'adam'"),
        (dict(optim_config={"learning_rate": 0.0}), "learning_rate must be a finite number > 0, got 0.0"),
        (dict(optim_config={"learning_rate": -1}), "learning_rate must be a finite number > 0, got -1"),
        (dict(optim_config={"learning_rate": float("nan")}), "learning_rate must be a finite number > 0, got nan"),
        (dict(optim_config={"learning_rate": float("inf")}), "got inf"),
        (dict(lr_decay=0), "lr_decay must be a finite number > 0, got 0"),
        (dict(lr_decay=-0.5), "lr_decay must be a finite number > 0, got -0.5"),
        (dict(batch_size=201, sampler="epoch"), r"batch_size=201 is larger than the training set \(200 rows\)"),
        (dict(num_epochs=-1), "num_epochs must be a non-negative integer, got -1"),
    ],
)
def test_solver_refuses_settings_that_cannot_be_right(options, message):
    with pytest.raises(ValueError, match=message):
        Solver(small_model("numpy"), small_data(), **options)


def test_the_solver_names_an_empty_training_set_and_models_it_cannot_train():
    data = small_data()
    with pytest.raises(ValueError, match=r"data\['X_train'\] is empty"):
        Solver(small_model("numpy"), {**data, "X_train": data["X_train"][:0], "y_train": data["y_train"][:0]})

    class NoParams:
        params: dict = {}

        def loss(self, X, y=None):
            return 0.0, {}

    with pytest.raises(ValueError, match="NoParams has no params: a model needs a dict of parameter arrays"):
        Solver(NoParams(), data)

    class LossAsText:
        def __init__(self):
            self.params = {"W": np.ones((data["X_train"].shape[1], 10))}

        def loss(self, X, y=None):
            return "0.5" if y is not None else X @ self.params["W"]

    with pytest.raises(TypeError, match=r"loss\(X, y\) must return \(loss, grads\), as xpnet's nets do; got str"):
        Solver(LossAsText(), data, batch_size=50, verbose=False).train()


def test_load_state_dict_names_what_does_not_fit():
    model = small_model("numpy", normalization="batchnorm")
    state = model.state_dict()
    with pytest.raises(ValueError, match="'params' is a dict of arrays and its 'buffers' a list of dicts"):
        model.load_state_dict({**state, "params": list(state["params"].values())})
    with pytest.raises(ValueError, match=r"saved parameters \['Wx'\] do not match the model's \['W1'"):
        model.load_state_dict({**state, "params": {"Wx": np.ones(2)}})
    buffers = [dict(b) for b in state["buffers"]]
    buffers[0]["running_mean"] = "zeros"
    with pytest.raises(ValueError, match="saved buffer 0's running_mean is not an array of floats"):
        model.load_state_dict({**state, "buffers": buffers})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"running_mean": np.zeros(7)}, r"saved buffer 0's running_mean has shape \(7,\), the model expects \(5,\)"),
        (
            {"running_var": np.zeros((1, 5))},
            r"saved buffer 0's running_var has shape \(1, 5\), the model expects \(5,\)",
        ),
        ({"momentum": 5}, r"saved buffer 0: momentum must be a number in \[0, 1\], got 5"),
        ({"eps": 0.0}, r"saved buffer 0: eps must be a finite number > 0, got 0.0"),
        ({"mode": "eval"}, r"saved buffer 0: mode must be 'train' or 'test', got 'eval'"),
        ({"unbiased_running_var": "yes"}, r"saved buffer 0: unbiased_running_var must be True or False, got 'yes'"),
        # test mode took its square root, and the model predicted NaN scores (class 0 for every input)
        (
            {"running_var": np.array([1.0, -0.5, 1.0, 1.0, 1.0])},
            "saved buffer 0's running_var holds negative values; a variance is never below 0",
        ),
    ],
)
def test_load_state_dict_refuses_layer_state_the_layer_would_refuse_later(change, message):
    """Each loaded, and failed at the next forward pass with no word of the file."""
    model = xpnet.FullyConnectedNet([5], input_dim=4, normalization="batchnorm", dtype="float64", seed=0)
    X = np.random.default_rng(0).standard_normal((6, 4))
    model.loss(X, np.arange(6) % 3)  # the running averages exist
    state = model.state_dict()
    scores = to_np(model.loss(X))
    with pytest.raises(ValueError, match=message):
        model.load_state_dict({**state, "buffers": [{**state["buffers"][0], **change}]})
    np.testing.assert_array_equal(to_np(model.loss(X)), scores)  # nothing was loaded


def test_load_state_dict_copies_another_models_arrays_onto_its_own_backend_and_dtype(backend):
    """A state made of another model's params was taken as it was: two models of one backend
    shared their weights (training one changed the other), a NumPy model got PyTorch tensors,
    and a float32 model kept float64 ones."""
    source = xpnet.FullyConnectedNet([5], input_dim=4, num_classes=3, dtype="float64", seed=0, backend=backend)
    state = {"params": source.params, "buffers": source.buffers()}
    same = xpnet.FullyConnectedNet([5], input_dim=4, num_classes=3, dtype="float64", seed=1, backend=backend)
    same.load_state_dict(state)
    before = to_np(source.params["W1"])
    xpnet.optim.sgd(same.params["W1"], same.params["W1"], {"learning_rate": 0.5})
    np.testing.assert_array_equal(to_np(source.params["W1"]), before)
    for target in ("numpy", "array_api_strict:device1"):
        other = xpnet.FullyConnectedNet([5], input_dim=4, num_classes=3, dtype="float32", seed=1, backend=target)
        other.load_state_dict(state)
        assert all(
            other.backend.owns(value) and value.dtype == other.backend.xp.float32 for value in other.params.values()
        )
        np.testing.assert_array_equal(to_np(other.params["W1"]), before.astype(np.float32))


def test_load_state_dict_refuses_nan_and_infinite_values():
    """A NaN weight loaded without a word, and the model then predicted one class for every input."""
    model = xpnet.FullyConnectedNet([5], input_dim=4, normalization="batchnorm", dtype="float64", seed=0)
    state = copy.deepcopy(model.state_dict())  # on NumPy it holds the model's own arrays
    state["params"]["W2"][1, 2] = np.nan
    with pytest.raises(ValueError, match=r"the saved state holds NaN or infinite values in params.W2"):
        model.load_state_dict(state)
    state = copy.deepcopy(model.state_dict())
    state["buffers"][0].update(running_mean=np.zeros(5), running_var=np.full(5, np.inf))
    with pytest.raises(ValueError, match=r"NaN or infinite values in buffers.0.running_var"):
        model.load_state_dict(state)


def test_load_state_dict_checks_the_arrays_of_every_library(backend):
    """The NaN and dtype checks looked at NumPy arrays only: a state made of PyTorch's or
    array-api-strict's arrays loaded NaN weights and integer ones, and running variances below
    0, into a NumPy model."""
    model = xpnet.FullyConnectedNet([5], input_dim=4, normalization="batchnorm", dtype="float64", seed=0)
    X = np.random.default_rng(0).standard_normal((6, 4))
    model.loss(X, np.arange(6) % 3)  # the running averages exist
    state = copy.deepcopy(model.state_dict())
    scores = to_np(model.loss(X))

    def on_backend(params=None, buffer=None):
        tree = {"params": {**state["params"], **(params or {})}, "buffers": [{**state["buffers"][0], **(buffer or {})}]}
        return checkpoint.tree_to_device(tree, backend)

    nan_weights = state["params"]["W2"].copy()
    nan_weights[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"the saved state holds NaN or infinite values in params.W2"):
        model.load_state_dict(on_backend(params={"W2": nan_weights}))
    with pytest.raises(ValueError, match=r"NaN or infinite values in buffers.0.running_mean"):
        model.load_state_dict(on_backend(buffer={"running_mean": np.full(5, -np.inf)}))
    with pytest.raises(ValueError, match=r"saved parameter W1 is not an array of floats \(got \S*int64 array\)"):
        model.load_state_dict(on_backend(params={"W1": np.ones((4, 5), np.int64)}))
    with pytest.raises(ValueError, match="saved buffer 0's running_var holds negative values"):
        model.load_state_dict(on_backend(buffer={"running_var": -np.ones(5)}))
    np.testing.assert_array_equal(to_np(model.loss(X)), scores)  # nothing was loaded
    model.load_state_dict(on_backend())
    np.testing.assert_array_equal(to_np(model.loss(X)), scores)


def test_load_state_dict_checks_running_averages_a_fresh_model_has_yet_to_make():
    fresh = xpnet.FullyConnectedNet([5], input_dim=4, normalization="batchnorm", dtype="float64", seed=0)
    saved = {"mode": "train", "running_mean": np.zeros((1, 5)), "running_var": np.ones((1, 5))}
    with pytest.raises(ValueError, match=r"running_mean has shape \(1, 5\), the model expects one value per feature"):
        fresh.load_state_dict({**fresh.state_dict(), "buffers": [saved]})
    saved = {"mode": "train", "running_mean": np.zeros(5), "running_var": np.ones(4)}
    with pytest.raises(ValueError, match=r"running_mean \(5,\) and running_var \(4,\) differ in shape"):
        fresh.load_state_dict({**fresh.state_dict(), "buffers": [saved]})


def test_a_fast94_model_file_with_another_whitening_filter_bank_is_refused():
    """Five whitening filters failed at the first forward pass as a bias that did not fit."""
    from xpnet.cnn import FastConvNet

    model = FastConvNet(widths=(4, 8, 8), dtype="float64")
    state = model.state_dict()
    frozen = {**state["buffers"][-1], "whiten_W": np.zeros((5, 3, 2, 2))}
    with pytest.raises(ValueError, match=r"saved buffer 6's whiten_W has shape \(5, 3, 2, 2\), the model expects \(24"):
        model.load_state_dict({**state, "buffers": [*state["buffers"][:-1], frozen]})


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_classes=1), "num_classes must be an integer >= 2, got 1"),
        (dict(weight_scale=float("inf")), "weight_scale must be a finite number, got inf"),
        (dict(weight_scale=float("nan")), "weight_scale must be a finite number, got nan"),
        (dict(reg=-0.1), "reg must be >= 0, got -0.1"),
        (dict(reg=float("inf")), "reg must be a finite number, got inf"),
    ],
)
def test_models_refuse_hyper_parameters_that_cannot_be_right(options, message):
    with pytest.raises(ValueError, match=message):
        small_model("numpy", **options)


def test_monolithic_net_refuses_bad_hyper_parameters():
    from xpnet.neural_net import TwoLayerNet

    with pytest.raises(ValueError, match="std must be a finite number, got inf"):
        TwoLayerNet(4, 5, 3, std=float("inf"))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        TwoLayerNet(4, 5, 1)
    net = TwoLayerNet(4, 5, 3)
    X, y = np.ones((6, 4)), np.zeros(6, dtype=np.int64)
    with pytest.raises(ValueError, match="reg must be >= 0"):
        net.train(X, y, X, y, reg=-1.0)


def test_backend_spec_with_a_device_for_numpy_is_refused():
    with pytest.raises(ValueError, match="'numpy:gpu': NumPy runs on the CPU only"):
        xpnet.get_backend("numpy:gpu")
    assert xpnet.get_backend("numpy:cpu").name == "numpy"


def test_batchnorm_needs_two_rows_in_train_mode(backend):
    x = backend.asarray(np.ones((1, 3)), dtype="float64")
    g = backend.asarray(np.ones(3), dtype="float64")
    with pytest.raises(ValueError, match=r"batchnorm_forward: train mode needs at least 2 rows.*\(1, 3\)"):
        layers.batchnorm_forward(x, g, g, {"mode": "train"})
    out, _ = layers.batchnorm_forward(x, g, g, {"mode": "test", "running_mean": g * 0, "running_var": g})
    assert tuple(out.shape) == (1, 3)


def test_empty_batches_are_refused(backend):
    empty = backend.asarray(np.zeros((0, 4)), dtype="float64")
    with pytest.raises(ValueError, match=r"affine_forward: empty batch, x has shape \(0, 4\)"):
        layers.affine_forward(empty, backend.asarray(np.ones((4, 2))), backend.asarray(np.ones(2)))
    labels = backend.asarray(np.zeros(0, dtype=np.int64))
    for loss in (layers.softmax_loss, layers.svm_loss):
        with pytest.raises(ValueError, match="empty batch"):
            loss(empty, labels)


def test_empty_feature_axes_are_refused(backend):
    """Scores without classes, and normalisations over no features, channels or pixels: a NumPy
    reduction error, a ZeroDivisionError or NaN with "Mean of empty slice" warnings before."""
    labels = backend.asarray(np.zeros(2, dtype=np.int64))
    for loss in (layers.softmax_loss, layers.svm_loss):
        with pytest.raises(ValueError, match=r"the scores have no classes, shape \(2, 0\)"):
            loss(backend.asarray(np.zeros((2, 0)), dtype="float64"), labels)
    none = backend.asarray(np.zeros(0), dtype="float64")
    for forward, param in ((layers.batchnorm_forward, {"mode": "train"}), (layers.layernorm_forward, {})):
        with pytest.raises(ValueError, match=r"x \(3, 0\) has no features to normalise"):
            forward(backend.asarray(np.zeros((3, 0)), dtype="float64"), none, none, param)
    pixels = "has no channels or no pixels to normalise"
    for shape in ((2, 0, 4, 4), (2, 3, 0, 4)):
        c = shape[1]
        x = backend.asarray(np.zeros(shape), dtype="float64")
        gamma = backend.asarray(np.ones(c), dtype="float64")
        for mode in ("train", "test"):
            param = {"mode": mode, "running_mean": gamma * 0, "running_var": gamma}
            with pytest.raises(ValueError, match=re.escape(f"spatial_batchnorm_forward: x {shape} {pixels}")):
                layers.spatial_batchnorm_forward(x, gamma, gamma, param)
        gamma4 = backend.asarray(np.ones((1, c, 1, 1)), dtype="float64")
        with pytest.raises(ValueError, match=rf"spatial_groupnorm_forward: x .* {pixels}"):
            layers.spatial_groupnorm_forward(x, gamma4, gamma4, 1, {})


def test_layers_speak_of_shapes_dtypes_and_libraries(backend):
    x = backend.asarray(np.ones((2, 4)), dtype="float64")
    w = backend.asarray(np.ones((4, 3)), dtype="float64")
    b = backend.asarray(np.ones(3), dtype="float64")
    _, cache = layers.affine_forward(x, w, b)
    with pytest.raises(ValueError, match=r"affine_backward: dout has shape \(2, 5\), expected \(2, 3\)"):
        layers.affine_backward(backend.asarray(np.ones((2, 5)), dtype="float64"), cache)
    ints = backend.asarray(np.ones((2, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="affine_forward: x must be a floating-point array, got dtype int64"):
        layers.affine_forward(ints, w, b)
    with pytest.raises(TypeError, match="relu_forward: x must be a floating-point array"):
        layers.relu_forward(ints)
    with pytest.raises(ValueError, match=r"relu_backward: dout has shape \(2, 3\) but x has shape \(2, 4\)"):
        layers.relu_backward(b[None, :] * w[:2, :], x)
    if backend.name != "numpy":
        with pytest.raises(TypeError, match=r"affine_forward: arrays from different libraries \(x from numpy"):
            layers.affine_forward(np.ones((2, 4)), w, b)
    # Lists, as the course's indexing took them: named, not called a library of their own.
    scores = backend.asarray(np.ones((2, 3)), dtype="float64")
    with pytest.raises(TypeError, match=r"svm_loss: y must be an array, got list \(np.asarray\(y\) makes one\)"):
        layers.svm_loss(scores, [0, 1])
    with pytest.raises(TypeError, match="relu_forward: x must be an array, got list"):
        layers.relu_forward([1.0, -1.0])


def test_arrays_of_one_library_on_two_devices_are_refused_naming_each_device():
    """Two GPUs of one library (a model on cupy:0, a batch on cupy:1) failed inside the library,
    which named neither argument: array-api-strict's device1 stands in for the second GPU."""
    from xpnet import fast_layers, optim

    here, there = xpnet.get_backend("array_api_strict"), xpnet.get_backend("array_api_strict:device1")
    x = here.asarray(np.ones((2, 3)), dtype="float64")
    w, b = there.asarray(np.ones((3, 4)), dtype="float64"), there.asarray(np.ones(4), dtype="float64")
    words = "arrays on different devices ({}); move them to one device first"
    with pytest.raises(ValueError, match=re.escape("affine_forward: " + words.format(
            f"x on {x.device}, w on {w.device}, b on {b.device}"))):  # fmt: skip
        layers.affine_forward(x, w, b)
    labels = there.asarray(np.zeros(2, dtype=np.int64))
    with pytest.raises(
        ValueError, match=re.escape("softmax_loss: " + words.format(f"x on {x.device}, y on {labels.device}"))
    ):
        layers.softmax_loss(x, labels)
    with pytest.raises(ValueError, match=re.escape("sgd: " + words.format(f"w on {w.device}, dw on {x.device}"))):
        optim.sgd(w, x, {})
    images, filters = here.asarray(np.ones((1, 3, 4, 4))), there.asarray(np.ones((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="conv_forward_fast: arrays on different devices"):
        fast_layers.conv_forward_fast(images, filters, None, {"stride": 1, "pad": 1})
    out, _ = layers.affine_forward(x, here.asarray(w), here.asarray(b))  # moved, it runs
    assert out.device == x.device


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_models_refuse_masked_inputs_as_the_layers_and_the_solver_do():
    """A model converted what it was given onto its backend, which dropped a masked array's
    mask: predict and loss scored the data under the mask, which check_accuracy refuses."""
    from xpnet.solver import Solver

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 6)), rng.integers(0, 3, 6)
    masked = np.ma.masked_array(X, mask=X > 1)
    model = small_model("numpy")
    for call, argument in (
        (lambda: model.predict(masked), "X"),
        (lambda: model.loss(masked, y), "X"),
        (lambda: model.loss(X, np.ma.masked_array(y)), "y"),
    ):
        with pytest.raises(TypeError, match=rf"^FullyConnectedNet: {argument} is a MaskedArray: the layers do not"):
            call()
    with pytest.raises(TypeError, match=r"^FullyConnectedNet: X is a matrix: np.matrix's \* and \*\* are matrix"):
        model.predict(np.matrix(X))

    class HandWritten:  # the Solver's own conversion for a model without prepare_inputs
        def __init__(self):
            self.params = {"W": np.zeros((6, 3))}

        def loss(self, X, y=None):
            scores = X @ self.params["W"]
            return scores if y is None else layers.softmax_loss(scores, y)[:1] + ({"W": self.params["W"] * 0},)

    data = {"X_train": X, "y_train": y, "X_val": X, "y_val": y}
    solver = Solver(HandWritten(), data, verbose=False)
    with pytest.raises(TypeError, match=r"^HandWritten: X is a MaskedArray: the layers do not honour masks"):
        solver.prepare_inputs(masked)
    np.testing.assert_array_equal(model.predict(X), model.predict(X.tolist()))  # lists still convert


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_subclasses_whose_operators_differ_are_refused_by_name():
    """On a square np.matrix, ``*`` is a matrix product: gelu_forward, dropout_forward and
    relu_backward gave wrong numbers and Adam NaN without a word. A masked array's mask was
    ignored or half honoured (softmax_loss and rmsprop gave other numbers than on the filled
    array). Both are refused, naming the function and the argument; other subclasses still pass."""
    from xpnet import optim
    from xpnet.backend import namespace

    x = np.random.default_rng(0).standard_normal((4, 4))
    labels = np.arange(4)
    calls = {
        "gelu_forward": (lambda a: layers.gelu_forward(a), "x"),
        "dropout_forward": (lambda a: layers.dropout_forward(a, {"p": 0.5, "mode": "train", "seed": 0}), "x"),
        "softmax_loss": (lambda a: layers.softmax_loss(a, labels), "x"),
        "relu_backward": (lambda a: layers.relu_backward(a, x), "dout"),
        "adam": (lambda a: optim.adam(x.copy(), a), "dw"),
        "rmsprop": (lambda a: optim.rmsprop(x.copy(), a), "dw"),
    }
    for name, (call, argument) in calls.items():
        with pytest.raises(TypeError, match=rf"^{name}: {argument} is a matrix: np.matrix's \* and \*\* are matrix"):
            call(np.matrix(x))
        with pytest.raises(TypeError, match=rf"^{name}: {argument} is a MaskedArray: the layers do not honour masks"):
            call(np.ma.masked_array(x, mask=x > 1))
    with pytest.raises(TypeError, match=r"arrays of type numpy.matrix: np.matrix's \*"):
        namespace(np.matrix(x))
    # a subclass whose arithmetic is the ndarray's, as np.memmap's, is a NumPy array to the layers,
    # beside plain ones too (it was called an array of another library, named after its module)

    class Tagged(np.ndarray):
        pass

    out, _ = layers.gelu_forward(x.view(Tagged))
    np.testing.assert_array_equal(np.asarray(out), layers.gelu_forward(x)[0])
    out, _ = layers.affine_forward(x.view(Tagged), x, x[0])
    np.testing.assert_array_equal(np.asarray(out), layers.affine_forward(x, x, x[0])[0])


def test_float_dtypes_the_layers_do_not_take_are_named_as_such():
    """Big-endian float32 (a FITS or MATLAB file's) and float128 are floating-point, yet they were
    refused as "must be a floating-point array". Big-endian arrays are refused, since the layers
    choose their float32 and float16 paths by dtype (GELU's erf came out 1 ulp off), with the
    conversion to write; it gives the native result."""
    from xpnet import optim

    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    swapped = x.astype(">f4")
    message = r"gelu_forward: x has dtype >f4, float32 in the other byte order: np.asarray\(x, dtype=np.float32\)"
    with pytest.raises(TypeError, match=message):
        layers.gelu_forward(swapped)
    np.testing.assert_array_equal(
        layers.gelu_forward(np.asarray(swapped, dtype=np.float32))[0], layers.gelu_forward(x)[0]
    )
    with pytest.raises(TypeError, match=r"adam: dw has dtype >f8, float64 in the other byte order"):
        optim.adam(np.ones(3), np.ones(3, dtype=">f8"))
    if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:  # x86's 80-bit long double
        with pytest.raises(TypeError, match=r"relu_forward: x must be float16, float32 or float64, got dtype float128"):
            layers.relu_forward(np.ones(3, dtype=np.longdouble))


@pytest.mark.parametrize(
    "forward, backward",
    [
        (lambda x, g, b: layers.batchnorm_forward(x, g, b, {"mode": "train"}), layers.batchnorm_backward),
        (lambda x, g, b: layers.batchnorm_forward(x, g, b, {"mode": "train"}), layers.batchnorm_backward_alt),
        (lambda x, g, b: layers.layernorm_forward(x, g, b, {}), layers.layernorm_backward),
        (lambda x, g, b: layers.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 0}), layers.dropout_backward),
    ],
    ids=["batchnorm", "batchnorm_alt", "layernorm", "dropout"],
)
def test_normalisation_and_dropout_backward_passes_refuse_a_dout_of_another_shape(backend, forward, backward):
    """A (1, D) dout broadcasts against (N, D) arrays: without the check it gave gradients of the
    wrong sums instead of an error; other shapes failed inside the array library."""
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 6)))
    _, cache = forward(x, backend.asarray(np.ones(6)), backend.asarray(np.zeros(6)))
    for shape in ((1, 6), (6, 4), (4, 5)):
        with pytest.raises(ValueError, match=rf"{backward.__name__}: dout has shape \({shape[0]}, {shape[1]}\) but x"):
            backward(backend.asarray(np.ones(shape)), cache)


# ----------------------------------------------------------------------------- labels out of range
@pytest.mark.parametrize("loss_fn", [layers.softmax_loss, layers.svm_loss])
@pytest.mark.parametrize("bad_label", [5, -1])
def test_out_of_range_labels_give_nan_not_a_plausible_loss(backend, loss_fn, bad_label):
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 5)), dtype="float64")
    y = backend.asarray(np.array([0, bad_label, 2, 4], dtype=np.int64))
    loss, dx = loss_fn(x, y)
    assert math.isnan(float(loss))
    dx = to_np(dx)
    assert np.isnan(dx[1]).all() and np.isfinite(dx[[0, 2, 3]]).all()

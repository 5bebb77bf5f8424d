"""Data loading: CIFAR-10 in the official layout (a small fake set written
here, and the real one when present), the lookup order, downloads, digits."""

import hashlib
import io
import os
import pickle
import re
import tarfile
import urllib.request
import urllib.response

import numpy as np
import pytest
from helpers import shared_cifar, write_fake_cifar

from xpnet import data_utils
from xpnet.data_utils import DataError, find_CIFAR10, get_CIFAR10_data, load_CIFAR10, load_CIFAR_batch


def test_load_batch_layout(tmp_path):
    written = write_fake_cifar(tmp_path)
    X, y = load_CIFAR_batch(tmp_path / "data_batch_1")
    data, labels = written["data_batch_1"]
    assert X.shape == (20, 32, 32, 3) and X.dtype == np.float64
    # row layout: the R, G and B planes of a 32x32 image, one after the other
    assert X[3, 5, 7, 0] == data[3, 0 * 1024 + 5 * 32 + 7]
    assert X[3, 5, 7, 2] == data[3, 2 * 1024 + 5 * 32 + 7]
    assert y.tolist() == labels


def test_load_cifar10_concatenates_batches(tmp_path):
    written = write_fake_cifar(tmp_path)
    X_train, y_train, X_test, y_test = load_CIFAR10(tmp_path)
    assert X_train.shape == (100, 32, 32, 3) and y_train.shape == (100,)
    assert X_test.shape == (20, 32, 32, 3)
    assert y_train[20:40].tolist() == written["data_batch_2"][1]
    assert y_test.tolist() == written["test_batch"][1]


def test_get_cifar10_data_splits_and_subtracts_mean(tmp_path):
    write_fake_cifar(tmp_path / data_utils.CIFAR10_FOLDER)
    data = get_CIFAR10_data(tmp_path, num_training=80, num_validation=15, num_test=10)
    assert data["X_train"].shape == (80, 3, 32, 32) and data["X_train"].dtype == np.float32
    assert data["X_val"].shape == (15, 3, 32, 32) and data["X_test"].shape == (10, 3, 32, 32)
    X_train, y_train, _, _ = load_CIFAR10(tmp_path / data_utils.CIFAR10_FOLDER)
    mean = X_train[:80].mean(0)
    np.testing.assert_allclose(data["X_val"], (X_train[80:95] - mean).transpose(0, 3, 1, 2), atol=1e-4)
    assert data["y_val"].tolist() == y_train[80:95].tolist()  # validation rows: the end of the training set
    np.testing.assert_allclose(data["X_train"].mean(0), 0, atol=1e-3)
    raw = get_CIFAR10_data(
        tmp_path,
        num_training=80,
        num_validation=15,
        num_test=10,
        subtract_mean=False,
        channels_first=False,
        dtype="float64",
    )
    assert raw["X_train"].shape == (80, 32, 32, 3) and raw["X_train"].dtype == np.float64


def test_too_many_rows_requested(tmp_path):
    write_fake_cifar(tmp_path)
    with pytest.raises(ValueError, match="exceeds the 100 training rows"):
        get_CIFAR10_data(tmp_path, num_training=90, num_validation=20)
    with pytest.raises(ValueError, match="num_test = 21 exceeds the 20 test rows"):
        get_CIFAR10_data(tmp_path, num_training=80, num_validation=20, num_test=21)


@pytest.mark.parametrize("switch", ["subtract_mean", "channels_first", "download"])
def test_switches_take_true_or_false_not_a_truthy_string(tmp_path, switch):
    """subtract_mean='False' subtracted the mean and download='no' downloaded: a string is truthy."""
    write_fake_cifar(tmp_path)
    with pytest.raises(ValueError, match=f"^{switch} must be True or False, got 'no'$"):
        get_CIFAR10_data(tmp_path, num_training=80, num_validation=10, num_test=10, **{switch: "no"})
    off = get_CIFAR10_data(tmp_path, num_training=80, num_validation=10, num_test=10, **{switch: np.False_})
    assert off["X_train"].shape[1:] == ((32, 32, 3) if switch == "channels_first" else (3, 32, 32))


def test_download_takes_progress_as_true_or_false(tmp_path):
    with pytest.raises(ValueError, match="^progress must be True or False, got 'off'$"):
        data_utils.download_CIFAR10(tmp_path, url="file:///nonexistent", progress="off")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("switch", ["subtract_mean", "images"])
def test_the_digits_switches_take_true_or_false(switch):
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match=f"^{switch} must be True or False, got 'False'$"):
        data_utils.load_digits_data(**{switch: "False"})


def test_the_digits_seed_is_checked_by_name():
    """NumPy's SeedSequence said 'expects int or sequence of ints for entropy not batchnorm'."""
    pytest.importorskip("sklearn")
    for seed in ("batchnorm", -1, 1.5):
        with pytest.raises(ValueError, match=f"^seed must be None or a non-negative integer, got {seed!r}$"):
            data_utils.load_digits_data(seed=seed)


@pytest.mark.parametrize(
    "counts, message",
    [
        (dict(num_training=0), "num_training must be an integer >= 1, got 0"),  # its mean image would be NaN
        (dict(num_training=-10), "num_training must be an integer >= 1, got -10"),  # rows from the end
        (dict(num_validation=-1), "num_validation must be an integer >= 0, got -1"),
        (dict(num_test=2.5), "num_test must be an integer >= 0, got 2.5"),
    ],
)
def test_row_counts_that_cannot_be_right(tmp_path, counts, message):
    write_fake_cifar(tmp_path)
    with pytest.raises(ValueError, match=message):
        get_CIFAR10_data(tmp_path, **{"num_training": 80, "num_validation": 10, "num_test": 10, **counts})
    data = get_CIFAR10_data(tmp_path, num_training=np.int64(80), num_validation=np.int64(0), num_test=10)
    assert data["X_val"].shape[0] == 0 and np.isfinite(data["X_test"]).all()


def test_lookup_order(tmp_path, monkeypatch):
    explicit, env, home = tmp_path / "explicit", tmp_path / "env", tmp_path / "home"
    write_fake_cifar(env / data_utils.CIFAR10_FOLDER)
    write_fake_cifar(home / ".cache" / "xpnet" / data_utils.CIFAR10_FOLDER)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XPNET_DATA_DIR", str(env))
    assert find_CIFAR10() == env / data_utils.CIFAR10_FOLDER
    write_fake_cifar(explicit)
    assert find_CIFAR10(explicit) == explicit
    monkeypatch.delenv("XPNET_DATA_DIR")
    assert find_CIFAR10() == home / ".cache" / "xpnet" / data_utils.CIFAR10_FOLDER


def test_a_batch_file_given_as_the_data_folder_is_named_with_its_folder(tmp_path, monkeypatch):
    """XPNET_DATA_DIR set to a batch file was only listed among the places looked in."""
    folder = tmp_path / data_utils.CIFAR10_FOLDER
    write_fake_cifar(folder)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XPNET_DATA_DIR", str(folder / "data_batch_1"))
    with pytest.raises(FileNotFoundError, match=f"data_batch_1 is a file; give the folder that holds it, {folder}"):
        find_CIFAR10()


def test_sizes_given_by_position_are_refused_with_the_names_to_use(tmp_path, monkeypatch):
    """The course's get_CIFAR10_data takes the sizes first; here the data folder comes first."""
    write_fake_cifar(tmp_path / data_utils.CIFAR10_FOLDER)
    monkeypatch.setenv("XPNET_DATA_DIR", str(tmp_path))
    with pytest.raises(TypeError, match=r"data_dir must be a folder path .*got 80 .*num_training=\.\.\."):
        get_CIFAR10_data(80, 20, 20)
    with pytest.raises(TypeError, match=r"data_dir must be a folder path .*got \['a'\]$"):
        find_CIFAR10(["a"])


def test_image_dtypes_are_floats_or_raw_uint8_checked_before_loading(tmp_path, monkeypatch):
    """uint8 with the mean subtracted came back as float64 without a word, complex64 with a
    ComplexWarning, 'bogus' as NumPy's TypeError after the seconds that loading takes."""
    written = write_fake_cifar(tmp_path / data_utils.CIFAR10_FOLDER)
    sizes = dict(num_training=15, num_validation=5, num_test=4)
    for dtype in ("uint8", "int64", "complex64", "bogus"):
        with pytest.raises(ValueError, match=f"dtype must be a floating type .*got '{dtype}'"):
            get_CIFAR10_data(tmp_path / "nowhere", dtype=dtype, **sizes)  # refused before the folder is looked for
    with pytest.raises(ValueError, match=r"got 'uint8': raw pixels need subtract_mean=False \(an integer array"):
        get_CIFAR10_data(tmp_path, dtype="uint8", **sizes)  # which of the two settings to change
    raw = get_CIFAR10_data(tmp_path, dtype="uint8", subtract_mean=False, **sizes)
    assert raw["X_train"].dtype == np.uint8
    np.testing.assert_array_equal(raw["X_train"][0].ravel(), written["data_batch_1"][0][0])
    assert get_CIFAR10_data(tmp_path, dtype=np.float16, **sizes)["X_train"].dtype == np.float16
    with pytest.raises(ValueError, match="or 'uint8' for raw pixels\\), got 'int8'"):
        load_CIFAR_batch(tmp_path / "nowhere", dtype="int8")


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        get_CIFAR10_data(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "XPNET_DATA_DIR" in message
    # Only xpnet-train has --download: the way to fetch it names that command, and the Python call.
    assert "xpnet-train --dataset cifar10 --download" in message and "download_CIFAR10()" in message


def test_missing_and_corrupt_batches_are_named(tmp_path):
    write_fake_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_CIFAR10(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3.*corrupt"):
        load_CIFAR10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"data_batch_3.*expected \(N, 3072\)"):
        load_CIFAR10(tmp_path)


def test_a_root_or_batch_path_of_the_wrong_kind_says_what_to_give(tmp_path):
    """A batch file or the folder above as load_CIFAR10's root was reported as a batch missing under
    it, a folder given to load_CIFAR_batch as a missing batch, and None failed inside os.path."""
    folder = tmp_path / data_utils.CIFAR10_FOLDER
    write_fake_cifar(folder, per_batch=2)
    with pytest.raises(NotADirectoryError, match=rf"root '.*data_batch_1' is a file; .* '{folder}'$"):
        load_CIFAR10(folder / "data_batch_1")
    with pytest.raises(FileNotFoundError, match=rf"no batches in '{tmp_path}', but '{folder}' holds them: give that$"):
        load_CIFAR10(tmp_path)
    with pytest.raises(
        TypeError, match=r"^load_CIFAR10: root must be the cifar-10-batches-py folder's path \(str or Path\), got None"
    ):
        load_CIFAR10(None)
    with pytest.raises(IsADirectoryError, match=r"is a folder; give one batch file in it, such as '.*data_batch_1'"):
        load_CIFAR_batch(folder)
    with pytest.raises(TypeError, match=r"^load_CIFAR_batch: filename must be a file path \(str or Path\), got None"):
        load_CIFAR_batch(None)
    assert load_CIFAR10(folder)[0].shape == (10, 32, 32, 3)


def make_archive(tmp_path):
    source = tmp_path / "src"
    write_fake_cifar(source / data_utils.CIFAR10_FOLDER, per_batch=4)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / data_utils.CIFAR10_FOLDER, arcname=data_utils.CIFAR10_FOLDER)
    archive = tmp_path / "cifar.tar.gz"
    archive.write_bytes(buffer.getvalue())
    return archive, hashlib.md5(buffer.getvalue()).hexdigest()


def test_download_checks_md5_and_unpacks(tmp_path):
    archive, md5 = make_archive(tmp_path)
    folder = data_utils.download_CIFAR10(tmp_path / "dest", url=archive.as_uri(), md5=md5, progress=False)
    assert folder == tmp_path / "dest" / data_utils.CIFAR10_FOLDER
    X, y, _, _ = load_CIFAR10(folder)
    assert X.shape == (20, 32, 32, 3)
    assert not list((tmp_path / "dest").glob("*.tar.gz")) and not list((tmp_path / "dest").glob("*.part"))


def test_download_unpacks_only_the_batch_files(tmp_path):
    """An archive that names a path outside the batches folder (through '..'), a nested file or
    a link: only the batch files come out, as plain files."""
    source = tmp_path / "src"
    write_fake_cifar(source / data_utils.CIFAR10_FOLDER, per_batch=4)
    (source / "payload").write_text("outside")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / data_utils.CIFAR10_FOLDER, arcname=data_utils.CIFAR10_FOLDER)
        tar.add(source / "payload", arcname=f"{data_utils.CIFAR10_FOLDER}/../escaped")
        tar.add(source / "payload", arcname=f"{data_utils.CIFAR10_FOLDER}/sub/nested")
        link = tarfile.TarInfo(f"{data_utils.CIFAR10_FOLDER}/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive = tmp_path / "cifar.tar.gz"
    archive.write_bytes(buffer.getvalue())
    md5 = hashlib.md5(buffer.getvalue()).hexdigest()
    folder = data_utils.download_CIFAR10(tmp_path / "dest", url=archive.as_uri(), md5=md5, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(data_utils.CIFAR10_FILES)
    assert not (tmp_path / "dest" / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_download_rejects_bad_md5_and_reports_failures(tmp_path):
    archive, _ = make_archive(tmp_path)
    with pytest.raises(DataError, match="md5"):
        data_utils.download_CIFAR10(tmp_path / "dest", url=archive.as_uri(), md5="0" * 32, progress=False)
    assert not any((tmp_path / "dest").iterdir())
    with pytest.raises(OSError, match="downloading CIFAR-10 from .* failed"):
        data_utils.download_CIFAR10(tmp_path / "dest", url=(tmp_path / "missing.tar.gz").as_uri(), progress=False)


def test_an_interrupted_download_leaves_nothing_that_looks_like_the_data_set(tmp_path, monkeypatch):
    """Ctrl-C while the archive arrives leaves no part of it; while it is unpacked, no half
    batch file and no data_batch_1 (by which the folder is found), so the next call starts
    over instead of the loader meeting a truncated file."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # so that only dest can hold a data set
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    archive, md5 = make_archive(tmp_path)
    dest = tmp_path / "dest"
    source = tmp_path / "src" / data_utils.CIFAR10_FOLDER

    class Interrupted(urllib.response.addinfourl):
        def read(self, size=-1):
            raise KeyboardInterrupt

    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Interrupted(real_urlopen(*a, **k), {}, a[0]))
    with pytest.raises(KeyboardInterrupt):
        data_utils.download_CIFAR10(dest, url=archive.as_uri(), md5=md5, progress=False)
    assert list(dest.iterdir()) == []
    monkeypatch.setattr(urllib.request, "urlopen", real_urlopen)

    copied = []
    real_copy = shutil.copyfileobj

    def copy_then_interrupt(src, dst, length=0):
        if len(copied) == 3:
            dst.write(src.read(100))  # a batch file half written
            raise KeyboardInterrupt
        copied.append(dst.name)
        real_copy(src, dst, length)

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        data_utils.download_CIFAR10(dest, url=archive.as_uri(), md5=md5, progress=False)
    folder = dest / data_utils.CIFAR10_FOLDER
    left = sorted(p.name for p in folder.iterdir())
    assert len(left) == 3 and "data_batch_1" not in left
    assert all((folder / name).read_bytes() == (source / name).read_bytes() for name in left)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        data_utils.find_CIFAR10(dest)
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert data_utils.download_CIFAR10(dest, url=archive.as_uri(), md5=md5, progress=False) == folder
    assert load_CIFAR10(folder)[0].shape == (20, 32, 32, 3)
    assert sorted(p.name for p in dest.iterdir()) == [data_utils.CIFAR10_FOLDER]


def test_get_cifar10_data_downloads_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    archive, md5 = make_archive(tmp_path)
    monkeypatch.setattr(data_utils, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(data_utils, "CIFAR10_MD5", md5)
    with pytest.raises(FileNotFoundError):
        get_CIFAR10_data(tmp_path / "data", num_training=15, num_validation=5, num_test=4)
    data = get_CIFAR10_data(tmp_path / "data", num_training=15, num_validation=5, num_test=4, download=True)
    assert data["X_train"].shape == (15, 3, 32, 32)


def test_digits_data_layout():
    data = data_utils.load_digits_data()
    assert data["X_train"].shape == (1297, 64) and data["X_val"].shape == (200, 64)
    assert data["X_test"].shape == (300, 64)
    assert set(np.unique(data["y_train"])) == set(range(10))
    np.testing.assert_allclose(data["X_train"].mean(0), 0, atol=1e-5)
    raw = data_utils.load_digits_data(subtract_mean=False)
    assert raw["X_train"].min() >= 0 and raw["X_train"].max() <= 1


@pytest.mark.parametrize(
    "counts, message",
    [
        (dict(num_validation=2.5), "num_validation must be an integer >= 0, got 2.5"),  # failed inside a slice
        (dict(num_test="3"), "num_test must be an integer >= 0, got '3'"),
        (dict(num_validation=-1), "num_validation must be an integer >= 0, got -1"),
        (dict(num_validation=1000, num_test=797), "num_validation + num_test must leave training rows out of 1797"),
    ],
)
def test_digits_data_refuses_counts_that_cannot_split_it(counts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        data_utils.load_digits_data(**counts)


@pytest.mark.skipif(shared_cifar() is None, reason="CIFAR-10 not present (set XPNET_DATA_DIR)")
def test_real_cifar10_test_batch():
    X, y = load_CIFAR_batch(shared_cifar() / "test_batch", dtype="float32")
    assert X.shape == (10000, 32, 32, 3)
    assert X.min() >= 0 and X.max() <= 255
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10

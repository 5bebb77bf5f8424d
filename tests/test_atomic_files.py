"""Files written whole or not at all: :func:`xpnet.atomic_files.atomic_write`, and the
writers that go through it (checkpoints are tested in test_safety.py and test_solver.py,
a sweep's outputs in test_tune.py, the benchmark's report in test_bench.py)."""

import errno
import os

import numpy as np
import pytest
from helpers import deny_writing

from xpnet.atomic_files import atomic_write


def temporaries(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def disk_full():
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("mode, old, half", [("wb", b"old bytes", b"half"), ("w", "old text", "half")])
@pytest.mark.parametrize("failure", [disk_full, KeyboardInterrupt])
def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, mode, old, half, failure):
    path = tmp_path / "out"
    with atomic_write(path, mode) as f:
        f.write(old)
    with pytest.raises(type(failure())), atomic_write(path, mode) as f:
        f.write(half)
        f.flush()
        raise failure()
    assert path.read_bytes() == (old if mode == "wb" else old.encode())
    assert temporaries(tmp_path) == []


def test_a_write_puts_the_whole_file_in_missing_folders_with_the_usual_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "rows.csv"
    old = os.umask(0o022)
    try:
        with atomic_write(path, "w", newline="") as f:
            f.write("x,é\r\n1,2\r\n")  # csv's line ends pass through untouched with newline=""
    finally:
        os.umask(old)
    assert path.read_bytes() == "x,é\r\n1,2\r\n".encode()
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert temporaries(path.parent) == []


def test_a_write_removes_what_killed_writers_left_in_the_folder_and_nothing_else(tmp_path):
    """The cleanup runs wherever a file is written (a home folder, /tmp): only names exactly
    like its own temporaries' go, a dead process's; other programs' look-alikes stay."""
    dead = tmp_path / ".summary.json.tmp-999999999-0123abcd"
    dead.write_text("{")
    foreign = [
        ".notes.tmp-999999999",
        ".notes.tmp-999999999-backup",
        ".x.tmp-999999999-0123ABCD",
        "a.tmp-999999999-0123abcd",
    ]
    for name in foreign:
        (tmp_path / name).write_text("someone else's")
    with atomic_write(tmp_path / "summary.json", "w") as f:
        f.write("{}")
    assert sorted(temporaries(tmp_path)) == sorted(foreign)


def test_a_write_through_a_link_replaces_the_file_it_points_to_and_keeps_the_link(tmp_path):
    """As open() writes through a link: the rename replaced the link itself with a file."""
    (tmp_path / "results").mkdir()
    target, link = tmp_path / "results" / "run-5.json", tmp_path / "latest.json"
    target.write_text("old")
    link.symlink_to(target)
    with atomic_write(link, "w") as f:
        f.write("new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert temporaries(tmp_path) == [] and temporaries(tmp_path / "results") == []


def test_a_write_keeps_an_existing_files_permissions(tmp_path):
    """As open() keeps them: a checkpoint made private (0600) became readable by all (0644)."""
    path = tmp_path / "private.npz"
    path.write_bytes(b"old")
    path.chmod(0o600)
    old = os.umask(0o022)
    try:
        with atomic_write(path) as f:
            f.write(b"new")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600


def test_a_write_keeps_a_file_the_user_may_not_write(tmp_path, monkeypatch):
    """The rename needs only the folder's permission, so it replaced a file made read-only to
    keep it, where open() refuses to write one."""
    path = tmp_path / "kept.npz"
    path.write_bytes(b"old")
    path.chmod(0o444)
    deny_writing(monkeypatch, path)
    with pytest.raises(PermissionError, match=r"the file is read-only; make it writable to replace it") as error:
        with atomic_write(path) as f:
            f.write(b"new")
    assert error.value.filename == str(path)
    assert path.read_bytes() == b"old" and temporaries(tmp_path) == []


def test_a_write_to_a_pipe_or_device_is_refused_and_leaves_it_in_place(tmp_path):
    """Renaming over /dev/null (as root) or a named pipe replaced it with a plain file."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(OSError, match=r"not a regular file .*a pipe.*renamed over it") as error:
        with atomic_write(pipe) as f:
            f.write(b"data")
    assert error.value.filename == str(pipe)
    assert pipe.is_fifo() and temporaries(tmp_path) == []


def test_atomic_write_refuses_other_modes(tmp_path):
    with pytest.raises(ValueError, match=r"^atomic_write: mode must be 'wb' or 'w', got 'a'$"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_figure_that_fails_to_save_leaves_the_old_picture(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from xpnet.vis_utils import plot_history

    history = {"loss_history": [2.3, 1.5], "train_acc_history": [0.1, 0.2], "val_acc_history": [0.1, 0.15]}
    path = tmp_path / "curves.png"
    plot_history(history, path)
    old = path.read_bytes()
    assert old[:4] == b"\x89PNG"

    def fails_half_way(self, fname, **kwargs):  # as matplotlib would: the target opened, half written
        if isinstance(fname, (str, os.PathLike)):
            with open(fname, "wb") as f:
                f.write(old[:100])
        else:
            fname.write(old[:100])
        raise disk_full()

    monkeypatch.setattr(Figure, "savefig", fails_half_way)
    with pytest.raises(OSError, match="No space left"):
        plot_history(history, path)
    assert path.read_bytes() == old
    assert temporaries(tmp_path) == []


def test_a_figure_saved_under_a_name_without_an_extension_is_a_png_named_as_matplotlib_names_it(tmp_path):
    pytest.importorskip("matplotlib")
    from xpnet.vis_utils import new_figure, plot_history, save_figure

    history = {"loss_history": [2.3, 1.5], "train_acc_history": [0.1, 0.2], "val_acc_history": [0.1, 0.15]}
    plot_history(history, tmp_path / "curves")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    figure = new_figure()
    figure.subplots().plot(np.arange(3))
    assert save_figure(figure, tmp_path / "plot.") == str(tmp_path / "plot.png")
    assert save_figure(figure, tmp_path / "plot.PDF") == str(tmp_path / "plot.PDF")
    assert (tmp_path / "plot.PDF").read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "plot.PDF", "plot.png"]

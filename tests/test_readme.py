"""README.md stays true: its Python examples run as written (on NumPy, with a small stand-in for
CIFAR-10 and short runs), every command line it shows parses with the command's flags, the nox
sessions it names exist and its search-space forms parse."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from helpers import write_fake_cifar

from xpnet.backend import current_backend, registry
from xpnet.cli import bench, sweep, train

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
NOXFILE = (Path(__file__).resolve().parents[1] / "noxfile.py").read_text()
PARSERS = {"train": train.build_parser, "bench": bench.build_parser, "sweep": sweep.build_parser}


def code_blocks_and_prose() -> tuple[list[tuple[str, str]], str]:
    """The README's fenced blocks as (language, text), and the text outside them."""
    blocks, prose, current = [], [], None
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current = (line[3:].strip(), [])
            else:
                blocks.append((current[0], "".join(current[1])))
                current = None
        elif current is not None:
            current[1].append(line)
        else:
            prose.append(line)
    assert current is None, "README has an unclosed code block"
    return blocks, "".join(prose)


def python_example(first_line: str, replacements=()) -> str:
    """The README's ```python block that starts with ``first_line``, each (old, new) replaced once:
    an old text that is not there fails, so the test follows the README rather than a stale copy."""
    blocks = [
        text for language, text in code_blocks_and_prose()[0] if language == "python" and text.startswith(first_line)
    ]
    assert len(blocks) == 1, f"README has {len(blocks)} python examples starting {first_line!r}"
    code = blocks[0]
    for old, new in replacements:
        assert code.count(old) == 1, f"README's example no longer has {old!r} once"
        code = code.replace(old, new)
    return code


def run_example(code: str) -> dict:
    scope = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


@pytest.fixture
def cifar_home(tmp_path, monkeypatch):
    """A home folder whose ~/data and $XPNET_DATA_DIR hold a small CIFAR-10 in the official
    layout (100 training and 20 test images), the working folder a scratch one."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    write_fake_cifar(folder, per_batch=20)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XPNET_DATA_DIR", str(folder))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_backend_example_runs(monkeypatch):
    monkeypatch.setattr(registry, "_PROCESS_DEFAULT", [None])
    code = python_example(
        "import xpnet\n\nxpnet.get_backend",
        [('get_backend("cupy:0")', 'get_backend("array_api_strict:device1")'),
         ('set_backend("cupy")', 'set_backend("array_api_strict")')],
    )  # fmt: skip
    run_example(code)
    assert current_backend().name == "array_api_strict"


def test_the_gradient_check_example_prints_small_errors(capsys):
    run_example(python_example("import numpy as np\nimport xpnet\nfrom xpnet.gradient_check"))
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["W1", "W2", "W3", "b1", "b2", "b3", "beta1", "beta2", "gamma1", "gamma2"]
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-6 for line in lines), lines  # a wrong gradient: 1e-3 and more


def test_the_solver_example_trains_and_checkpoints(cifar_home, capsys):
    code = python_example(
        "import xpnet\nfrom xpnet.data_utils import get_CIFAR10_data",
        [("get_CIFAR10_data()", "get_CIFAR10_data(num_training=80, num_validation=20, num_test=20)"),
         ('backend="cupy"', 'backend="numpy"'),
         ("batch_size=200, num_epochs=15", "batch_size=20, num_epochs=2")],
    )  # fmt: skip
    scope = run_example(code)
    written = sorted(p.name for p in (cifar_home / "runs").iterdir())
    assert written == ["cifar_epoch_1.npz", "cifar_epoch_2.npz", "cifar_model.npz"]
    best, test_accuracy = (float(v) for v in capsys.readouterr().out.split()[-2:])
    assert best == scope["solver"].best_val_acc
    # the reloaded model predicts what the trained one scored
    assert np.mean(np.asarray(scope["predictions"]) == scope["data"]["y_test"]) == test_accuracy


def test_the_recipe_example_runs_and_its_saved_model_scores_as_the_run_did(cifar_home):
    code = python_example(
        "from xpnet import data_utils\nfrom xpnet.recipes import fast94",
        [('backend="cupy", seed=0)', 'backend="numpy", seed=0, widths=(8, 16, 16), batch_size=32, epochs=1)')],
    )
    scope = run_example(code)
    scores, y_test = np.asarray(scope["scores"]), scope["y_test"]
    assert scores.shape == (20, 10)
    assert np.mean(np.argmax(scores, axis=1) == y_test) == scope["result"].test_accuracy


def readme_commands() -> list[tuple[str, str]]:
    """(command, its text) for each xpnet-train/-bench/-sweep or scripts/*.py command line with arguments,
    in a code block or in inline code (a line break there read as a space, a synopsis's [optional]
    brackets dropped so that its optional part parses too), each text once."""
    blocks, prose = code_blocks_and_prose()
    texts = []
    for language, block in blocks:
        if language in ("", "bash", "sh"):
            texts += block.replace("\\\n", " ").splitlines()
    texts += re.findall(r"`([^`]+)`", prose)
    commands = {}
    for text in texts:
        text = " ".join(re.sub(r"(?<!\S)\[|\](?!\S)", "", text).split())
        found = re.match(r"(?:python3? scripts/(train|bench|sweep)\.py|xpnet-(train|bench|sweep)) \S", text)
        if found:
            commands[text] = found.group(1) or found.group(2)
    return [(name, text) for text, name in commands.items()]


def test_the_readme_shows_many_commands():
    commands = readme_commands()
    assert len(commands) >= 15 and {name for name, _ in commands} == set(PARSERS)


@pytest.mark.parametrize("name, text", readme_commands(), ids=lambda value: value[:70])
def test_every_command_in_the_readme_parses(name, text, capsys):
    words = shlex.split(text, comments=True)
    argv = words[1:] if words[0].startswith("xpnet-") else words[2:]  # after `xpnet-train` or `python scripts/...`
    if "--help" in argv:
        return
    parser = PARSERS[name]()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"README's `{text}` does not parse: {capsys.readouterr().err.strip().splitlines()[-1]}")
    if name == "bench":  # and no flag in it is one that the parts it runs do not read
        args.suite = args.suite or ("none" if args.recipe else "fc")
        assert bench.unread_flag(parser, args) is None, text


def test_every_nox_session_the_readme_names_exists():
    sessions = set(re.findall(r"^@nox\.session(?:\(.*\))?\n(?:@.*\n)*def (\w+)", NOXFILE, re.M))
    named = {name for command in re.findall(r"nox -s ([\w ]+)", README) for name in command.split()}
    assert named >= {"tests", "lint", "gpu", "bench", "kernels"} and named <= sessions, (named, sessions)


def test_the_search_space_forms_in_the_readme_parse(tmp_path):
    from xpnet.tune import load_space_file, parse_space

    section = code_blocks_and_prose()[1].split("## Hyperparameter sweeps", 1)[1].split("\n## ", 1)[0]
    forms = [span for span in re.findall(r"`([^`]+)`", section) if re.fullmatch(r"\w+=(\w+\(.*\)|[\w.]+)", span)]
    assert len(forms) >= 5, forms
    assert set(parse_space(forms).describe()) == {form.split("=", 1)[0] for form in forms}
    files = [span for span in re.findall(r"`(\{.*?\})`", section, re.S)]
    assert len(files) == 1
    (tmp_path / "space.json").write_text(files[0])
    assert load_space_file(tmp_path / "space.json").describe() == json.loads(files[0])

"""The benchmark command runs and reports what it measured (timings themselves are never asserted)."""

import json

from xpnet.cli import bench


def test_conv_suite_on_the_cpu_reports_naive_fast_and_the_convnet_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--suite", "conv", "--repeats", "1", "--budget", "0.01", "--no-torch", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows, names, ratios = report["conv"]["course shapes (CPU)"]
    assert [row["case"] for row in rows] == ["conv forward", "conv backward", "max pool forward", "max pool backward"]
    for row in rows:
        assert row["results"]["naive"]["us"] > 0 and row["results"]["fast"]["us"] > 0
    step_rows = report["conv"]["ThreeLayerConvNet"][0]
    assert step_rows[0]["results"]["xpnet"]["us"] > 0
    printed = capsys.readouterr().out
    assert "| course shapes (CPU) | naive µs | fast µs | torch µs | naive/fast | fast/torch |" in printed


def test_fc_suite_with_one_small_config(capsys):
    assert bench.main(["--config", "16:8", "--rows", "64", "--repeats", "1", "--budget", "0.01", "--no-torch"]) == 0
    assert "| [16], 8 |" in capsys.readouterr().out


def test_tf32_is_refused_on_the_cpu(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        bench.main(["--tf32", "--config", "16:8"])
    assert info.value.code == 2
    assert "--tf32: TF32 applies to CUDA GPUs" in capsys.readouterr().err

"""The ``relprop`` command end to end on the embedded model, in a temporary directory."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import relprop
from relprop import cli, models


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_clean_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relprop: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_explain_writes_heatmaps_and_summaries_that_match_the_model(tmp_path, capsys):
    out = tmp_path / "explained"
    status, _, err = _run(
        capsys,
        "explain",
        "--method",
        "lrp.epsilon",
        "--limit",
        "4",
        "--batch-size",
        "3",
        "--out",
        str(out),
    )
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["results"]
    with open(out / "summary.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["input"] for r in csv_rows] == [r["input"] for r in rows] and len(rows) == 4

    model = models.load_default_model()
    images, labels = models.default_inputs()
    with torch.no_grad():
        logits = model(images[:4])
    relevance = relprop.create_analyzer("lrp.epsilon", model).analyze(images[:4])
    for i, row in enumerate(rows):
        assert row["label"] == int(labels[i])
        assert row["prediction"] == row["target"] == int(logits[i].argmax())
        assert row["logit"] == pytest.approx(float(logits[i].max()), rel=1e-5)
        assert row["relevance_sum"] == pytest.approx(float(relevance[i].sum()), rel=1e-4, abs=1e-4)
        assert float(csv_rows[i]["relevance_sum"]) == pytest.approx(row["relevance_sum"])
        assert row["seconds"] > 0
        with Image.open(out / row["heatmap"]) as png:
            assert png.size == (224, 224) and png.mode == "RGB"
            pixels = np.asarray(png)
        assert pixels.reshape(-1, 3).std(0).max() > 10  # not a constant image
    # No staging directory or temporary file is left beside the result.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explained"]


def test_explain_reads_png_pt_and_npy_inputs_and_explains_a_chosen_neuron(tmp_path, capsys):
    images, _ = models.default_inputs()
    big = Image.fromarray((images[3, 0].numpy() * 255).astype(np.uint8)).resize((56, 56))
    big.convert("RGB").save(tmp_path / "three.png")
    torch.save(images[:2], tmp_path / "pair.pt")
    np.save(tmp_path / "one.npy", images[5, 0].numpy())  # (H, W): the channel is added
    out = tmp_path / "out"
    status, _, err = _run(
        capsys,
        "explain",
        "--method",
        "gradient",
        "--neuron",
        "7",
        "--scale",
        "2",
        "--input",
        str(tmp_path / "three.png"),
        str(tmp_path / "pair.pt"),
        str(tmp_path / "one.npy"),
        "--out",
        str(out),
    )
    assert status == 0, err
    rows = json.loads((out / "summary.json").read_text())["results"]
    assert [r["input"] for r in rows] == ["three", "pair_000", "pair_001", "one"]
    assert all(r["target"] == 7 and r["label"] is None for r in rows)
    with Image.open(out / rows[0]["heatmap"]) as png:
        assert png.size == (56, 56)
    with torch.no_grad():
        logit = models.load_default_model()(images[5:6])[0, 7].item()
    assert rows[3]["logit"] == pytest.approx(logit, rel=1e-5)


def test_explain_with_weights_and_module_spec_matches_default(tmp_path, capsys):
    weights = Path(models.__file__).parent / "data" / "mnist_cnn.pt"
    spec = f"{weights}:relprop.models:MnistCNN"
    for name, model in (("custom", spec), ("default", "default")):
        status, _, err = _run(
            capsys,
            "explain",
            "--model",
            model,
            "--method",
            "gradient",
            "--limit",
            "2",
            "--out",
            str(tmp_path / name),
        )
        assert status == 0, err
    custom, default = (
        json.loads((tmp_path / name / "summary.json").read_text())["results"]
        for name in ("custom", "default")
    )
    assert [r["logit"] for r in custom] == [r["logit"] for r in default]
    status, _, err = _run(
        capsys,
        "explain",
        "--model",
        f"{tmp_path / 'nope.pt'}:relprop.models:MnistCNN",
        "--method",
        "gradient",
        "--out",
        str(tmp_path / "x"),
    )
    _assert_clean_error(status, err, "model weights file not found")
    status, _, err = _run(
        capsys, "explain", "--model", "vgg99", "--method", "gradient", "--out", str(tmp_path / "x")
    )
    _assert_clean_error(status, err, "unknown model 'vgg99'")


def test_custom_model_module_in_the_working_directory_imports_from_the_console_script(
    tmp_path, capsys, monkeypatch
):
    # The `relprop` console script's sys.path starts with its bin directory, not the working
    # directory that `python -m relprop` puts first: the README gives both as the same command.
    (tmp_path / "mynet.py").write_text(
        "from relprop.models import MnistCNN as Net\n", encoding="utf-8"
    )
    weights = Path(models.__file__).parent / "data" / "mnist_cnn.pt"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())]
    )
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    status, _, err = _run(
        capsys, "explain", "--model", f"{weights}:mynet:Net", "--method", "gradient",
        "--limit", "1", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert status == 0, err
    assert str(tmp_path) not in sys.path


def test_explain_into_existing_directory_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, _, err = _run(capsys, "explain", "--method", "input", "--limit", "1", "--out", str(out))
    assert status == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["digit00_label0_input.png", "keep.txt", "summary.csv", "summary.json"]


def test_compare_montage_has_a_tile_per_input_and_method(tmp_path, capsys):
    out = tmp_path / "grid.png"
    methods = "gradient,lrp.epsilon,random"
    status, _, err = _run(
        capsys, "compare", "--methods", methods, "--limit", "3", "--scale", "2", "--out", str(out)
    )
    assert status == 0, err
    with Image.open(out) as png:
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    # 3 rows × (input + 3 methods) of 56-px tiles with 4-px gaps, plus label margins.
    assert width > 4 * (56 + 4) and height > 3 * (56 + 4)
    assert width < 4 * (56 + 4) + 200 and height < 3 * (56 + 4) + 100
    # The bottom-right tile (random relevance) is far from constant.
    tile = pixels[-4 - 56 : -4, -4 - 56 : -4]
    assert tile.reshape(-1, 3).std(0).max() > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_evaluate_writes_table_plot_and_curves_with_random_baseline(tmp_path, capsys):
    out = tmp_path / "evaluation"
    status, stdout, err = _run(
        capsys,
        "evaluate",
        "--methods",
        "gradient,lrp.epsilon",
        "--num-samples",
        "10",
        "--patch",
        "7",
        "--fill",
        "uniform",
        "--out",
        str(out),
    )
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["results"]] == ["gradient", "lrp.epsilon", "random"]
    assert summary["settings"]["samples"] == 10 and summary["settings"]["steps"] == 16
    for row in summary["results"]:
        assert row["abpc"] == pytest.approx(row["aopc_morf"] - row["aopc_lerf"], abs=1e-9)
    with open(out / "curves.csv", newline="") as handle:
        curves = list(csv.DictReader(handle))
    assert len(curves) == 3 * 2 * 17
    with Image.open(out / "curves.png") as png:
        assert png.size[0] > 500 and png.size[1] > 300
    assert "| lrp.epsilon |" in (out / "summary.md").read_text() and "| random |" in stdout


def test_module_entry_point_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(relprop.__file__).parents[1])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relprop",
            "explain",
            "--method",
            "nonexistent",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    _assert_clean_error(result.returncode, result.stderr, "unknown method 'nonexistent'")
    assert not (tmp_path / "x").exists()


def test_error_missing_input_file(tmp_path, capsys):
    status, _, err = _run(
        capsys,
        "explain",
        "--method",
        "gradient",
        "--input",
        str(tmp_path / "missing.png"),
        "--out",
        str(tmp_path / "out"),
    )
    _assert_clean_error(status, err, "input file not found", "missing.png")
    assert not (tmp_path / "out").exists()


def test_error_unreadable_image(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    status, _, err = _run(
        capsys,
        "explain",
        "--method",
        "gradient",
        "--input",
        str(tmp_path / "broken.png"),
        "--out",
        str(tmp_path / "out"),
    )
    _assert_clean_error(status, err, "cannot read image", "broken.png")


def test_error_unknown_method_lists_valid_names(tmp_path, capsys):
    status, _, err = _run(
        capsys, "compare", "--methods", "gradient,lrp.epsilonn", "--out", str(tmp_path / "g.png")
    )
    _assert_clean_error(status, err, "'lrp.epsilonn'", "lrp.epsilon,", "deep_taylor")
    assert not (tmp_path / "g.png").exists()


def test_error_input_shape_the_model_cannot_take(tmp_path, capsys):
    np.save(tmp_path / "rgb.npy", np.zeros((3, 10, 10), dtype=np.float32))
    status, _, err = _run(
        capsys,
        "explain",
        "--method",
        "gradient",
        "--input",
        str(tmp_path / "rgb.npy"),
        "--out",
        str(tmp_path / "out"),
    )
    _assert_clean_error(status, err, "(3, 10, 10)", "(1, 28, 28)")


def test_error_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, _, err = _run(capsys, "explain", "--method", "gradient", "--out", str(blocker / "out"))
    _assert_clean_error(status, err, "cannot write to output directory")
    status, _, err = _run(
        capsys, "compare", "--methods", "gradient", "--out", str(blocker / "grid.png")
    )
    _assert_clean_error(status, err, "cannot write")


def test_error_out_of_range_neuron(tmp_path, capsys):
    status, _, err = _run(
        capsys, "explain", "--method", "gradient", "--neuron", "10", "--out", str(tmp_path / "o")
    )
    _assert_clean_error(status, err, "--neuron 10", "10 outputs")


def test_failure_midway_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    from relprop import visualize

    calls = []
    real_save = visualize.save_png

    def fail_on_third(rgb, path, scale=1):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(rgb, path, scale)

    monkeypatch.setattr(visualize, "save_png", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["explain", "--method", "gradient", "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_error_default_input_for_a_model_of_another_shape(tmp_path, capsys):
    status, _, err = _run(
        capsys,
        "explain",
        "--model",
        "resnet18",
        "--method",
        "gradient",
        "--out",
        str(tmp_path / "o"),
    )
    _assert_clean_error(status, err, "--input default", "image or tensor files")


def test_usage_errors_exit_2_without_running(capsys):
    assert cli.main([]) == 2
    assert cli.main(["explain", "--method", "gradient", "--out", "x", "--batch-size", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "--method", "lrp.epsilon", "--limit", "-3"],
        ["explain", "--method", "lrp.epsilon", "--limit", "0"],
        ["explain", "--method", "lrp.epsilon", "--scale", "-2"],
        ["explain", "--method", "lrp.epsilon", "--clip", "5"],
        ["explain", "--method", "lrp.epsilon", "--clip", "-0.5"],
        ["evaluate", "--methods", "gradient", "--num-samples", "0"],
        ["evaluate", "--methods", "gradient", "--steps", "-1"],
        ["evaluate", "--methods", "gradient", "--patch", "0"],
    ],
)
def test_bad_numeric_options_exit_2_without_running(tmp_path, capsys, argv):
    status = cli.main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["explain", "compare", "evaluate"])
def test_generic_lrp_method_is_refused_with_a_message(tmp_path, capsys, command):
    option = "--method" if command == "explain" else "--methods"
    out = tmp_path / ("o.png" if command == "compare" else "o")
    status, _, err = _run(capsys, command, option, "lrp", "--out", str(out))
    _assert_clean_error(status, err, "'lrp'", "lrp.epsilon_plus_flat")

"""The `keras-ibprune` commands: real outputs (sparse files, exports) and clear errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_ibprune as kib
from keras_ibprune import cli
from keras_ibprune.wrapper import PruneWrapper


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained digits CNN saved as .keras, and train / held-out / bad .npz files."""
    d = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    (xtr, ytr), (xval, yval), _ = cli.digits(0)
    model = cli.demo_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(xtr, ytr, epochs=3, batch_size=64, verbose=0)
    model.save(d / "model.keras")
    np.savez(d / "train.npz", x=xtr, y=ytr)
    np.savez(d / "held_out.npz", x=xval, y=yval)
    np.savez(d / "no_y.npz", x=xval)
    np.savez(d / "wrong_shape.npz", x=xval[:, :4], y=yval)
    np.savez(d / "short_y.npz", x=xval, y=yval[:10])
    (d / "garbage.npz").write_text("not a zip archive")
    return d


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def loaded(path):
    return keras.models.load_model(path)


def test_help_for_every_command(capsys):
    for name in ["", "demo", "prune", "export", "summary", "bench"]:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"] if name else ["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: keras-ibprune" in out
    assert run(capsys)[0] == 2  # no command: help, status 2


def test_console_script_help():
    exe = Path(sys.executable).with_name("keras-ibprune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "keras_ibprune_cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("demo", "prune", "export", "summary", "bench"):
        assert name in out.stdout


def test_cli_parses_before_importing_keras():
    code = ("import sys, keras_ibprune_cli as c; c.build_parser().parse_args(['summary', 'm']);"
            "print(sorted(m for m in ('keras', 'tensorflow', 'keras_ibprune') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.slow
def test_console_script_drops_native_log_lines(files):
    exe = Path(sys.executable).with_name("keras-ibprune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "keras_ibprune_cli"]
    out = subprocess.run([*cmd, "summary", str(files / "model.keras")], capture_output=True,
                         text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                      if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert out.returncode == 0 and "conv1" in out.stdout
    assert out.stderr == "", out.stderr[:500]


def test_prune_one_shot_writes_a_sparse_plain_model(files, tmp_path, capsys):
    out_path = tmp_path / "pruned.keras"
    rc, out, err = run(capsys, "prune", files / "model.keras", "--data",
                       files / "held_out.npz", "--sparsity", 0.9, "--out", out_path)
    assert rc == 0, err
    model = loaded(out_path)
    assert not any(isinstance(la, PruneWrapper) for la in model.layers)
    assert kib.sparsity(model) == pytest.approx(0.9, abs=1e-3)
    assert "total" in out and "90.00%" in out and "held-out after" in out
    assert "[4/4] wrote" in out


@pytest.mark.slow
def test_prune_with_fine_tuning(files, tmp_path, capsys):
    out_path = tmp_path / "ft.keras"
    rc, out, err = run(capsys, "prune", files / "model.keras", "--data", files / "held_out.npz",
                       "--sparsity", 0.75, "--train", files / "train.npz", "--epochs", 2,
                       "--score", "magnitude", "--out", out_path)
    assert rc == 0, err
    assert "epoch 1/2" in out and "epoch 2/2" in out  # progress
    model = loaded(out_path)
    assert kib.sparsity(model) == pytest.approx(0.75, abs=1e-3)
    per_layer = kib.sparsity_summary(model).as_dict()["layers"]
    assert all(v["sparsity"] == pytest.approx(0.75, abs=0.01) for v in per_layer.values())


def test_prune_keep_wrappers_then_summary(files, tmp_path, capsys):
    out_path = tmp_path / "wrapped.keras"
    rc, _, err = run(capsys, "prune", files / "model.keras", "--data", files / "held_out.npz",
                     "--sparsity", 0.5, "--keep-wrappers", "--exclude", "logits",
                     "--out", out_path)
    assert rc == 0, err
    model = loaded(out_path)
    wrapped = [la.layer.name for la in model.layers if isinstance(la, PruneWrapper)]
    assert wrapped and "logits" not in wrapped
    rows = kib.sparsity_summary(model).rows
    kept = sum(r["nonzero"] for r in rows if r["wrapped"])
    assert 1 - kept / sum(r["weights"] for r in rows if r["wrapped"]) == pytest.approx(0.5, 1e-3)
    rc, out, _ = run(capsys, "summary", out_path)
    assert rc == 0 and "parameters:" in out and "FLOPs" in out
    assert [ln for ln in out.splitlines() if ln.startswith("logits")][0].endswith(" 0.00%")


def test_prune_channel_shrinks(files, tmp_path, capsys):
    out_path = tmp_path / "small.keras"
    rc, out, err = run(capsys, "prune", files / "model.keras", "--data", files / "held_out.npz",
                       "--sparsity", 0.5, "--granularity", "channel", "--score", "magnitude",
                       "--out", out_path)
    assert rc == 0, err
    small, dense = loaded(out_path), loaded(files / "model.keras")
    assert small.count_params() < 0.7 * dense.count_params()
    assert small.get_layer("logits").kernel.shape[-1] == 10
    assert "shrunk:" in out


@pytest.mark.parametrize(
    "data, message",
    [
        ("no_y.npz", "no array named 'y'"),
        ("wrong_shape.npz", r"does not fit the model input: expected .*\(batch, 8, 8, 1\)"),
        ("short_y.npz", "same number of samples"),
        ("garbage.npz", "not an .npz"),
        ("missing.npz", "file not found"),
    ],
)
def test_prune_bad_data_is_a_clear_error(files, tmp_path, capsys, data, message):
    rc, out, err = run(capsys, "prune", files / "model.keras", "--data", files / data,
                       "--sparsity", 0.9, "--out", tmp_path / "x.keras")
    assert rc == 2
    assert err.startswith("keras-ibprune prune: error: ")
    assert pytest.importorskip("re").search(message, err), err
    assert "Received:" in err
    assert not (tmp_path / "x.keras").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "--sparsity must be in"),
        (["--sparsity", "0.5", "--epochs", "2"], "needs training data"),
        (["--sparsity", "0.5", "--train", "TRAIN"], "--train is used only when fine-tuning"),
    ],
)
def test_prune_bad_flags(files, tmp_path, capsys, args, message):
    args = [str(files / "train.npz") if a == "TRAIN" else a for a in args]
    rc, _, err = run(capsys, "prune", files / "model.keras", "--data", files / "held_out.npz",
                     *args, "--out", tmp_path / "x.keras")
    assert rc == 2 and message in err and "Received:" in err


def test_missing_model_and_bad_output_name(files, tmp_path, capsys):
    rc, _, err = run(capsys, "summary", tmp_path / "nope.keras")
    assert rc == 2 and "model file not found" in err
    rc, _, err = run(capsys, "summary", files / "garbage.npz")
    assert rc == 2 and "cannot load the model" in err
    rc, _, err = run(capsys, "prune", files / "model.keras", "--data", files / "held_out.npz",
                     "--sparsity", 0.5, "--out", tmp_path / "x.h5")
    assert rc == 2 and "must end with '.keras'" in err


@pytest.mark.slow
def test_prune_legacy_tf_keras_files(files, tmp_path, capsys):
    tf_keras = pytest.importorskip("tf_keras")
    tf_keras.utils.set_random_seed(0)
    L = tf_keras.layers
    legacy = tf_keras.Sequential([L.InputLayer((8, 8, 1)), L.Conv2D(8, 3, name="conv"),
                                  L.BatchNormalization(), L.ReLU(), L.Flatten(),
                                  L.Dense(10, name="logits")])
    # Compiled with a loss object: Keras 3 cannot read that training config back.
    legacy.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    legacy.save(tmp_path / "legacy.h5")
    legacy.save(tmp_path / "legacy_sm", save_format="tf")
    for src, score in (("legacy.h5", "ib"), ("legacy_sm", "magnitude")):
        out_path = tmp_path / f"{src}.keras"
        rc, out, err = run(capsys, "prune", tmp_path / src, "--data", files / "held_out.npz",
                           "--sparsity", 0.5, "--score", score, "--out", out_path)
        assert rc == 0, err
        assert kib.sparsity(loaded(out_path)) == pytest.approx(0.5, abs=1e-3)
        assert "[4/4] wrote" in out
    (tmp_path / "not_a_model").mkdir()
    rc, _, err = run(capsys, "prune", tmp_path / "not_a_model", "--data",
                     files / "held_out.npz", "--sparsity", 0.5, "--out", tmp_path / "x.keras")
    assert rc == 2 and "not a SavedModel" in err and "Received:" in err


@pytest.mark.slow
def test_export_float_and_int8(files, tmp_path, capsys):
    pruned = tmp_path / "p.keras"
    assert run(capsys, "prune", files / "model.keras", "--data", files / "held_out.npz",
               "--sparsity", 0.8, "--out", pruned)[0] == 0
    rc, out, err = run(capsys, "export", pruned, tmp_path / "p.tflite", "--latency-runs", 0)
    assert rc == 0, err
    assert (tmp_path / "p.tflite").stat().st_size > 0 and "top-1 agreement" in out
    rc, out, err = run(capsys, "export", pruned, tmp_path / "q.tflite", "--quantize", "int8",
                       "--data", files / "held_out.npz", "--min-agreement", 0.5,
                       "--latency-runs", 0)
    assert rc == 0, err
    assert re.search(r"int8 / (sparse|dense)", out)  # --encoding auto: the smaller gzip
    assert "keras   accuracy" in out and "tflite  accuracy" in out


def test_export_errors(files, tmp_path, capsys):
    rc, _, err = run(capsys, "export", files / "model.keras", tmp_path / "q.tflite",
                     "--quantize", "int8")
    assert rc == 2 and "needs calibration inputs" in err
    rc, _, err = run(capsys, "export", files / "model.keras", tmp_path / "q.tflite",
                     "--data", files / "wrong_shape.npz")
    assert rc == 2 and "does not fit the model input" in err
    rc, _, err = run(capsys, "export", files / "model.keras", tmp_path / "q.bin")
    assert rc == 2 and "must end with '.tflite'" in err
    assert not (tmp_path / "q.tflite").exists()


def test_load_npz_without_y(files):
    x, y = cli.load_npz(str(files / "no_y.npz"), need_y=False)
    assert x.dtype == np.float32 and y is None


@pytest.mark.slow
def test_bench_small(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc, out, err = run(capsys, "bench", "--sparsities", "0.8", "--dense-epochs", 2,
                       "--epochs", 2, "--rounds", 1, "--no-export", "--json", path)
    assert rc == 0, err
    result = json.loads(path.read_text())
    assert set(result["accuracy"]) == {"ib@0.8", "magnitude@0.8"}
    assert 0.2 < result["overhead"] < 5.0  # a ratio of median epoch times, not a timing bar
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    assert "| 80% |" in out and "[4/4]" in out
    rc, _, err = run(capsys, "bench", "--sparsities", "0.8,x")
    assert rc == 2 and "--sparsities" in err


@pytest.mark.slow  # the README's setup command runs the full demo in CI
def test_demo_small(capsys):
    rc, out, _ = run(capsys, "demo", "--dense-epochs", 1, "--prune-epochs", 2)
    assert rc == 0
    assert "[3/3] before / after" in out
    total = [ln for ln in out.splitlines() if ln.startswith("total")][0]
    assert total.split()[-1] == "90.0%"

"""The examples run (in-process, quick mode here; defaults with -m slow) and print what they
claim. (The docs are checked in `test_docs.py`.)"""

import contextlib
import importlib.util
import io
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name, *args, quick=True, tmp_path=None):
    """Runs `examples/<name>.py`'s `main(args)` in this process; returns what it printed."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    old_cwd, old_env = os.getcwd(), os.environ.get("KIB_QUICK")
    os.environ["KIB_QUICK"] = "1" if quick else "0"
    out = io.StringIO()
    try:
        os.chdir(tmp_path or ROOT)
        sys.path.insert(0, str(EXAMPLES))
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(out):
            module.main(list(args))
    finally:
        sys.path.remove(str(EXAMPLES))
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("KIB_QUICK", None)
        else:
            os.environ["KIB_QUICK"] = old_env
    return out.getvalue()


def total_sparsity(stdout):
    """The overall sparsity of the last printed `kib.sparsity_summary` table."""
    totals = [ln for ln in stdout.splitlines() if ln.startswith("total ")]
    assert totals, stdout
    return float(totals[-1].split()[-1].rstrip("%")) / 100


def table_row(stdout, key):
    rows = [ln for ln in stdout.splitlines() if ln.startswith(key)]
    assert rows, f"no row {key!r} in:\n{stdout}"
    return [float(v.replace(",", "")) for v in rows[-1][len(key):].split()]


def check_mnist_cnn(out):
    assert "data: MNIST" in out or "scikit-learn digits" in out
    assert total_sparsity(out) == pytest.approx(0.9, abs=1e-3)
    dense_nz, pruned_nz = table_row(out, "nonzero params")
    assert pruned_nz < 0.2 * dense_nz
    for key in ("accuracy", "precision", "recall", "f1"):
        assert 0.0 <= table_row(out, key)[1] <= 1.0
    dense_tfl, pruned_tfl = table_row(out, ".tflite bytes")
    assert pruned_tfl < 0.5 * dense_tfl
    assert table_row(out, "int8 .tflite bytes")[1] < dense_tfl


def check_text_classification(out):
    # The real SMS Spam Collection when ../shared holds it, else the labelled synthetic task.
    assert "SMS Spam Collection (real data), 403 duplicate texts dropped" in out or (
        "GENERATED sentiment task" in out)
    assert "stratified, seed 0" in out and "macro averages" in out
    for key in ("accuracy", "precision", "recall", "f1"):
        assert all(0.0 <= v <= 1.0 for v in table_row(out, key))
    assert "TFLite input: int32 token ids" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if "%" in ln}
    pruned = ("attention", "ff_in", "ff_out")
    # The IB allocation splits the 80 % budget unevenly across the pruned layers.
    weights = sum(int(rows[layer][-3]) for layer in pruned)
    nonzero = sum(int(rows[layer][-2]) for layer in pruned)
    assert 1 - nonzero / weights == pytest.approx(0.8, abs=2e-3)
    assert all(float(rows[layer][-1].rstrip("%")) > 50 for layer in pruned)
    for layer in ("token_embedding", "logits"):
        assert rows[layer][-1] == "0.00%"
    assert "top-1 agreement with Keras" in out


def check_custom_training_loop(out):
    assert "(masks updated)" in out
    assert total_sparsity(out) == pytest.approx(0.85, abs=1e-3)
    assert "I_TY/fc" in out


def check_subclassed_model(out):
    assert total_sparsity(out) == pytest.approx(0.9, abs=1e-3)
    assert "agreement 1.0000" in out


def check_structured_shrink(out):
    diff = float(re.search(r"max \|shrunk - masked\| = (\S+)", out).group(1))
    assert diff < 1e-4
    dense_p, shrunk_p = table_row(out, "parameters")
    assert shrunk_p < 0.6 * dense_p
    dense_f, shrunk_f = table_row(out, "FLOPs")
    assert shrunk_f < dense_f


def check_pretrained_finetune(out):
    assert "pretrained model" in out
    for score in ("magnitude", "ib"):
        row = [ln for ln in out.splitlines() if ln.startswith(f"{score} ")][-1].split()
        assert row[-1] == "80.00%"
    assert total_sparsity(out) == pytest.approx(0.8, abs=1e-3)


CHECKS = {
    "mnist_cnn": check_mnist_cnn,
    "text_classification": check_text_classification,
    "custom_training_loop": check_custom_training_loop,
    "subclassed_model": check_subclassed_model,
    "structured_shrink": check_structured_shrink,
    "pretrained_finetune": check_pretrained_finetune,
}


# Examples that start several processes: run (slow) by tests/test_distributed.py.
MULTI_PROCESS = {"multi_worker", "jax_data_parallel"}


def test_every_example_is_tested():
    assert {p.stem for p in EXAMPLES.glob("*.py")} == set(CHECKS) | MULTI_PROCESS
    distributed = (Path(__file__).parent / "test_distributed.py").read_text()
    assert all(f'_example("{name}")' in distributed for name in MULTI_PROCESS)


HEAVY = {"text_classification", "structured_shrink", "pretrained_finetune", "mnist_cnn",
         "subclassed_model"}  # -m slow


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in sorted(CHECKS)])
def test_example_quick(name, tmp_path):
    CHECKS[name](run_example(name, tmp_path=tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_defaults(name, tmp_path):
    CHECKS[name](run_example(name, quick=False, tmp_path=tmp_path))


@pytest.mark.slow
def test_text_example_with_magnitude_scores(tmp_path):
    check_text_classification(run_example("text_classification", "--score", "magnitude",
                                          tmp_path=tmp_path))


@pytest.mark.slow
def test_mnist_example_falls_back_to_digits_with_a_warning(tmp_path, capsys):
    out = run_example("mnist_cnn", "--data-dir", str(tmp_path / "nothing"), tmp_path=tmp_path)
    assert "data: scikit-learn digits" in out
    assert "MNIST IDX files not found" in capsys.readouterr().err
    check_mnist_cnn(out)
    with pytest.raises(SystemExit, match="MNIST IDX files not found.*Received"):
        run_example("mnist_cnn", "--data", "mnist", "--data-dir", str(tmp_path / "nothing"))


def test_text_example_reads_a_tsv_corpus(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import text_classification as tc
    finally:
        sys.path.remove(str(EXAMPLES))
    path = tmp_path / "corpus.tsv"
    path.write_text("pos\tgood film\nneg\tbad film\n\npos\tlovely\n", encoding="utf-8")
    texts, labels = tc.read_corpus(path)
    assert texts == ["good film", "bad film", "lovely"] and labels.tolist() == [1, 0, 1]
    path.write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="label<TAB>text.*line 1"):
        tc.read_corpus(path)
    texts, labels = tc.generated_corpus(200)
    assert len(texts) == 200 and set(labels.tolist()) == {0, 1}
    texts, labels, dropped = tc.deduplicate(["a", "b", "a", "c", "b"], [0, 1, 0, 1, 1])
    assert texts == ["a", "b", "c"] and labels.tolist() == [0, 1, 1] and dropped == 2
    labels = np.array([0] * 80 + [1] * 20)
    train, val, test = tc.stratified_split(labels)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))
    assert [int(labels[i].sum()) for i in (train, val, test)] == [14, 3, 3]

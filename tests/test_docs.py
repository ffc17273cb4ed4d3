"""Every Python block of the README and docs runs as written; links resolve; the API page
names every public symbol."""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def blocks(path):
    return re.findall(r"```python\n(.*?)\n```", path.read_text(encoding="utf-8"), re.S)


def run_blocks(codes, tmp_path, namespace=None):
    """Executes `codes` in order in one namespace, in `tmp_path`; returns (namespace, out)."""
    namespace = {} if namespace is None else namespace
    out = io.StringIO()
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out):
            for i, code in enumerate(codes):
                exec(compile(code, f"<block {i}>", "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(old)
    return namespace, out.getvalue()


def test_readme_quickstart_runs_as_written(tmp_path):
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, re.S).group(1)
    assert len(code.splitlines()) <= 20
    _, out = run_blocks([code], tmp_path)
    total = [ln for ln in out.splitlines() if ln.startswith("total")]
    assert total and total[0].split()[-1] == "80.00%", out


@pytest.mark.slow
def test_guides_run_as_written(tmp_path):
    ns, out = run_blocks(blocks(DOCS / "guides.md"), tmp_path)
    assert ns["kib"].sparsity(ns["history"].model) == pytest.approx(0.9, abs=2e-3)
    assert ns["kib"].sparsity(ns["final"]) == pytest.approx(0.8, abs=2e-3)  # one-shot 0.8
    assert (tmp_path / "model_int8.tflite").exists() and ns["report"].file_bytes > 0
    assert ns["pruner"].logs()["sparsity"] == pytest.approx(0.85, abs=2e-3)
    assert ns["kib"].count_flops(ns["small"]) < ns["kib"].count_flops(ns["model"])
    # "Smaller vs faster": the shrunk phone model computes about half the FLOPs
    dense_flops = ns["kib"].count_flops(ns["make_model"]())
    assert ns["kib"].count_flops(ns["phone_model"]) <= 0.55 * dense_flops
    assert len(ns["kib"].stats.find_wrappers(ns["pruned_text"])) == 3


def test_cli_doc_blocks_run_after_the_guides_setup(tmp_path):
    setup = blocks(DOCS / "guides.md")[0]
    run_blocks([setup, *blocks(DOCS / "cli.md")], tmp_path)
    assert (tmp_path / "held_out.npz").exists()


def test_migration_keras_ibprune_side_runs(tmp_path):
    data, _, ours = blocks(DOCS / "migration_from_tfmot.md")
    ns, _ = run_blocks([data, ours], tmp_path)
    assert ns["kib"].sparsity(ns["final"]) == pytest.approx(0.9, abs=2e-3)


@pytest.mark.slow
def test_migration_tfmot_side_runs(tmp_path):
    data, theirs, _ = blocks(DOCS / "migration_from_tfmot.md")
    script = tmp_path / "tfmot_side.py"
    script.write_text(data + "\n" + theirs + "\nprint('ok', final.count_params())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_every_python_block_is_run_by_a_test():
    counted = {"guides.md": None, "cli.md": None, "migration_from_tfmot.md": 3,
               "pipelines.md": 3}  # run by test_legacy.py
    for doc in sorted(DOCS.glob("*.md")):
        n = len(blocks(doc))
        assert n == 0 or doc.name in counted, f"{doc.name} has {n} untested python blocks"


def _links(path):
    text = path.read_text(encoding="utf-8")
    return [m for m in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
            if not re.match(r"[a-z]+:", m)]


def test_docs_links_resolve():
    missing = []
    for doc in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]:
        for link in _links(doc):
            if not (doc.parent / link).resolve().exists():
                missing.append(f"{doc.name}: {link}")
    assert not missing, missing


def test_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("concepts", "guides", "migration_from_tfmot", "api", "faq", "cli",
                 "architecture"):
        assert f"docs/{name}.md" in readme, name


def test_api_reference_covers_the_public_api():
    import keras_ibprune as kib

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [n for n in kib.__all__ if n != "__version__" and f"`{n}" not in api
               and f"kib.{n}" not in api]
    assert not missing, missing


def test_benchmarks_md_is_built_from_the_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8") == report.build(), (
        "BENCHMARKS.md differs from benchmarks/BENCHMARKS.in.md + benchmarks/results: run "
        "`python benchmarks/report.py`")

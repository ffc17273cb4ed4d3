"""The README's commands and quickstart are the ones CI runs and they work as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _ci_var(name):
    text = (ROOT / ".ci" / "run").read_text()
    return re.search(rf"^{name}='(.*)'$", text, re.M).group(1)


def test_ci_runs_the_readme_commands_verbatim():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert _ci_var("SETUP_CMD") in blocks
    assert _ci_var("TEST_CMD") in blocks
    assert "keras-ibprune demo" in _ci_var("SETUP_CMD")


def test_quickstart_runs_as_written(tmp_path):
    section = README.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, re.S).group(1)
    assert len(code.splitlines()) <= 20
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    total = [ln for ln in out.stdout.splitlines() if ln.startswith("total")]
    assert total and total[0].split()[-1] == "80.00%", out.stdout

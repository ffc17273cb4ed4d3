"""The README's two commands are the ones CI runs (the quickstart runs in test_docs.py)."""

import re
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

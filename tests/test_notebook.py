"""S6.ipynb: its first cell run as a Colab user runs it, without the project's files beside it; and what
its stored outputs show, as GitHub renders them."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

CELLS = json.loads((ROOT / "S6.ipynb").read_text())["cells"]


def run_setup_cell(repo, folder, then=""):
    """Run the first code cell with REPO set to ``repo`` in ``folder``, then the code ``then``."""
    source = "".join(next(cell for cell in CELLS if cell["cell_type"] == "code")["source"])
    assert source.startswith("# @title") and 'REPO = ""  # @param {type:"string"}' in source, "a Colab form"
    source = source.replace('REPO = ""', f"REPO = {repo!r}") + "\n" + then
    return subprocess.run([sys.executable, "-c", source], cwd=folder, capture_output=True, text=True,
                          timeout=300, check=False)


def test_without_the_files_or_an_address_the_first_cell_says_what_to_do(tmp_path):
    result = run_setup_cell("", tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "set REPO in the first cell" in result.stderr and "upload" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = run_setup_cell(str(tmp_path / "nowhere"), tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "git clone" in result.stderr and "nowhere" in result.stderr and "check REPO" in result.stderr


@pytest.mark.slow  # a git clone and a fresh process that loads torch
def test_with_an_address_the_first_cell_clones_and_the_project_imports(tmp_path):
    committed = subprocess.run(["git", "ls-files", "model.py", "data.py", "utils.py"], cwd=ROOT,
                               capture_output=True, text=True, check=False).stdout.split()
    if len(committed) < 3:
        pytest.skip("not a git checkout with the project committed")
    then = "import model, data, utils\nprint(os.getcwd(), model.Net.__name__, data.__file__)"
    result = run_setup_cell(f"file://{ROOT}", tmp_path, then)
    assert result.returncode == 0, result.stderr
    clone = tmp_path / ROOT.name
    assert result.stdout.split()[-3:] == [str(clone), "Net", str(clone / "data.py")]


def stored_outputs():
    """The stored outputs of S6.ipynb: [(mime types, text)]."""
    outputs = [output for cell in CELLS for output in cell.get("outputs", [])]
    return [(set(data := output.get("data", {})), "".join(output.get("text") or data.get("text/plain") or ""))
            for output in outputs]


def test_the_stored_outputs_are_a_full_run_that_reads_well_on_github():
    outputs = stored_outputs()
    texts = "\n".join(text for _, text in outputs)
    assert re.search(r"^epoch 20/20 ", texts, re.MULTILINE)
    assert re.search(r"^brief S6 \(under 20,000 parameters.*\): met\. 19,130 parameters, 20 epochs; test "
                     r"accuracy final 99\.\d\d%", texts, re.MULTILINE)
    assert re.search(r"^lowest: \d \d+\.\d\d%, \d", texts, re.MULTILINE)  # per-digit accuracy
    # No progress bars: GitHub renders a stored bar's widget as an empty "0%| | 0/235" line.
    assert not any("application/vnd.jupyter.widget-view+json" in kinds for kinds, _ in outputs)
    assert not re.search(r"\d+%\|", texts)
    # Nothing of the machine it ran on, and no command-line flags (the notebook takes none).
    assert not re.search(r"(^|[\s'\"(=])/[\w.-]+/[\w.-]+", texts), texts
    assert not re.search(r"(?<![\w-])--[a-z][a-z-]+", texts), texts

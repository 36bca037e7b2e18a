"""The notebook's first cell, run as a Colab user runs it: without the project's files beside it."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def run_setup_cell(repo, folder, then=""):
    """Run the first code cell with REPO set to ``repo`` in ``folder``, then the code ``then``."""
    cells = json.loads((ROOT / "S6.ipynb").read_text())["cells"]
    source = "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])
    assert 'REPO = ""  # @param {type:"string"}' in source, "REPO is a Colab form field, empty by default"
    source = source.replace('REPO = ""', f"REPO = {repo!r}") + "\n" + then
    return subprocess.run([sys.executable, "-c", source], cwd=folder, capture_output=True, text=True,
                          timeout=300, check=False)


def test_without_the_files_or_an_address_the_first_cell_says_what_to_do(tmp_path):
    result = run_setup_cell("", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "set REPO in the first cell" in result.stderr and "upload" in result.stderr
    assert result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_bad_address_is_named_in_one_message(tmp_path):
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
    """The text of every stored output of S6.ipynb, cell by cell."""
    cells = json.loads((ROOT / "S6.ipynb").read_text())["cells"]
    texts = []
    for cell in cells:
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain") or ""
            texts.append("".join(text))
    return texts


def test_the_stored_outputs_are_a_full_run_with_no_machine_path_or_command_line_flag():
    texts = stored_outputs()
    assert any(line.startswith("epoch 20 ") for text in texts for line in text.splitlines())
    for text in texts:
        assert not re.search(r"(^|[\s'\"(=])/[\w.-]+/[\w.-]+", text), text
        assert not re.search(r"(?<![\w-])--[a-z][a-z-]+", text), text

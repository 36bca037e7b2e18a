"""The GitHub workflow runs what .ci/run runs."""

import re

from conftest import ROOT


def test_the_workflow_check_steps_are_commands_of_ci_run():
    workflow = (ROOT / ".github" / "workflows" / "tests.yml").read_text()
    steps = re.findall(r"- name: (.*)\n\s+run: (.*)\n", workflow)
    mirrored = [command for name, command in steps if name.endswith("(as .ci/run)")]
    assert mirrored == ["python architecture.py", "ruff check .", "pytest"]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(command in ci_lines for command in mirrored)
    assert "check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/tests.yml" in ci_lines
    # The README's test command is the one both run.
    assert "pytest" in (ROOT / "README.md").read_text()

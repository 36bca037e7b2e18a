"""report.py: the results table of run folders, the verdict of a brief, and the tables of the README and
RESULTS.md, which are its output over the committed run records."""

import importlib.util
import json
import re
import shlex

import pytest
import torch

import report
from conftest import DRY_FLAGS, ROOT, cli


def write_run(folder, tests, trains=None, seed=0, params=7_000, **config):
    """A finished run's metrics.json with these test accuracies per epoch."""
    trains = trains or [value - 0.1 for value in tests]
    epochs = [{"epoch": index + 1, "test_acc": test, "train_acc": train, "seconds": 10.0}
              for index, (test, train) in enumerate(zip(tests, trains))]
    folder.mkdir(parents=True)
    config = {"model": "NetCompact", "seed": seed, "epochs": len(tests), **config}
    metrics = {"model": "NetCompact", "params": params, "seed": seed, "receptive_field": [32, 32],
               "config": config, "epochs": epochs}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def cells(text, name):
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |")).strip("|").split(" | ")


def test_a_table_of_runs_and_a_seeds_folder_holds_their_figures(tmp_path, capsys):
    write_run(tmp_path / "step1", [98.0, 99.3, 99.5, 99.41], brief="S7", rotate=10.0)
    write_run(tmp_path / "seeds" / "seed0", [99.0, 99.5, 99.6], seed=0)
    write_run(tmp_path / "seeds" / "seed1", [99.0, 99.2, 99.38], seed=1)
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path / "dry")[0] == 0  # a real run's metrics.json
    text = report.table([tmp_path / "step1", tmp_path / "seeds", tmp_path / "dry"])
    assert text.splitlines()[0] == "| " + " | ".join(report.header()) + " |"
    step = [cell.strip() for cell in cells(text, "step1")]
    # S7 asks for 99.4% in each of the last 3 epochs: 99.30 is one of them.
    assert step[1:] == ["NetCompact", "7,000", "32", "4", "brief S7, rotate 10", "99.41", "99.50", "99.30",
                        "-0.10", "S7: no", "40 s"]
    seeds = [cell.strip() for cell in cells(text, "seeds")]
    assert seeds[6:11] == ["99.490 ± 0.156 (min 99.38, seeds 0,1)", "99.49", "99.00", "-0.10", "S6: 1 of 2"]
    dry = json.loads((tmp_path / "dry" / "metrics.json").read_text())
    assert cells(text, "dry")[6].strip() == f"{dry['epochs'][-1]['test_acc']:.2f}"
    per_seed = report.table([tmp_path / "seeds"], per_seed=True)
    names = [line.split(" | ")[0] for line in per_seed.splitlines()[2:]]
    assert names == ["| seeds/seed0", "| seeds/seed1", "| seeds"]


def test_the_verdict_of_a_brief_says_what_held_and_what_missed():
    epochs = [{"epoch": e, "test_acc": acc, "train_acc": 99.0} for e, acc in
              enumerate([98.0, 99.45, 99.3, 99.42, 99.41, 99.5], start=1)]
    facts = report.judge(epochs, params=7_900, brief="S7")
    assert facts["target_from"] == 4 and facts["best_epoch"] == 6 and facts["met"]
    assert report.verdict(facts).startswith("brief S7 (under 8,000 parameters, 15 epochs or fewer, 99.4% "
                                            "test accuracy in each of the last 3 epochs): met. 7,900")
    late = report.judge(epochs[:3], params=19_130, brief="S7")
    assert not late["met"] and late["target_from"] is None
    assert late["missed"] == ["19,130 parameters, the budget is under 8,000",
                              "98.00% in the last 3 epochs, under 99.4%"]


def test_report_draws_the_curves_and_answers_a_folder_without_runs_in_one_line(tmp_path, capsys):
    write_run(tmp_path / "a", [99.0, 99.5])
    figure = report.plot_curves([tmp_path / "a"])
    assert list(figure.axes[0].lines[0].get_ydata()) == [99.0, 99.5]
    assert report.main([str(tmp_path / "a"), "--plot", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 5_000
    assert report.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty'} holds no finished run")


TABLES = [(path, match) for path in ("README.md", "RESULTS.md")
          for match in re.finditer(r"<!-- (python report\.py [^>]*?) -->\n\n?(\|.*?\|)\n(?!\|)",
                                   (ROOT / path).read_text(), re.DOTALL)]


@pytest.mark.parametrize(("path", "match"), TABLES, ids=[f"{path}:{match.start()}" for path, match in TABLES])
def test_the_tables_of_the_readme_and_results_are_reports_of_the_committed_records(path, match, monkeypatch):
    monkeypatch.chdir(ROOT)
    words = shlex.split(match.group(1))[2:]
    split = words[words.index("--split") + 1] if "--split" in words else "test"
    folders = [word for word in words if not word.startswith("--") and word != split]
    assert report.table(folders, per_seed="--per-seed" in words, split=split) == match.group(2)


def test_the_readme_has_its_model_table():
    assert any(path == "README.md" for path, _ in TABLES)


def test_the_sweep_candidates_build_the_layers_their_records_name(tmp_path):
    # What RESULTS.md tells a reader to do: append the candidates to model.py.
    path = tmp_path / "model.py"
    path.write_text((ROOT / "model.py").read_text() + (ROOT / "records/sweeps/candidates.py").read_text())
    spec = importlib.util.spec_from_file_location("model_with_candidates", path)
    candidates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(candidates)
    records = sorted((ROOT / "records/sweeps").glob("*/*/seed0/metrics.json"))
    assert len(records) >= 10
    for path in records:
        metrics = json.loads(path.read_text())
        name = "NetCompactR3" if path.parts[-3].startswith("nc-") else metrics["model"]
        model = getattr(candidates, name)()
        assert sum(p.numel() for p in model.parameters()) == metrics["params"], path
        assert repr(model).split("\n", 1)[1] == metrics["layers"].split("\n", 1)[1], path


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    predictions, labels = torch.tensor([0, 1, 1, 2, 0, 2]), torch.tensor([0, 0, 1, 2, 2, 2])
    counts = report.confusion_matrix(predictions, labels, classes=3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_plot_history_draws_train_and_test_curves_of_loss_and_accuracy():
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 0.5 / e, "train_acc": 98 + e / 10,
                "test_acc": 98.5 + e / 10} for e in (1, 2, 3)]
    loss_axes, acc_axes = report.plot_history(history).axes
    assert [list(line.get_ydata()) for line in loss_axes.lines] == [[1, 0.5, 1 / 3], [0.5, 0.25, 0.5 / 3]]
    assert list(acc_axes.lines[1].get_ydata()) == [98.6, 98.7, 98.8] and "98.80%" in acc_axes.get_title()
    # One epoch: its points sit inside axes of some extent, not on a degenerate range.
    loss_axes, acc_axes = report.plot_history(history[:1]).axes
    assert loss_axes.get_xlim() == acc_axes.get_xlim() == (0.5, 1.5)
    low, high = loss_axes.get_ylim()
    assert low < 0.5 and high > 1 and high / low > 2

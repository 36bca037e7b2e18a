"""bench.py: what it refuses before it runs, and what it keeps when it stops."""

import json
import subprocess

import pytest
import torch

import bench

ARM = {"model": "Net", "params": 19_130, "macs": 1_693_760, "batch_size": 256, "epoch_seconds": 10.0,
       "images_per_second": 6000.0, "test_seconds": 0.5, "peak_memory_mb": 900.0}


def test_bench_refuses_a_bad_json_path_or_an_absent_device_before_it_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        bench.main(["--json", str(tmp_path / "no" / "such" / "folder.json")])
    assert caught.value.code == 2 and "--json" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "no usable CUDA GPU" in err


def test_ctrl_c_shows_the_finished_rounds_and_a_full_disk_keeps_the_figures_shown(capsys, monkeypatch):
    calls = []

    def arm(command, **kwargs):  # each arm's process, as it answers; Ctrl-C in the third
        calls.append(command)
        if len(calls) == 3:
            raise KeyboardInterrupt
        figures = {**ARM, "arm": command[command.index("--arm") + 1]}
        return subprocess.CompletedProcess(command, 0, json.dumps(figures), "")

    monkeypatch.setattr(bench.subprocess, "run", arm)
    assert bench.main(["--rounds", "2", "--device", "cpu"]) == 130
    out, err = capsys.readouterr()
    assert "ratio reference/ours: training 1.00x (rounds: 1.00)" in out
    assert err == "interrupted: 1 of 2 rounds finished, shown above\n"
    calls.clear()
    assert bench.main(["--rounds", "1", "--device", "cpu", "--json", "/dev/full"]) == 2
    out, err = capsys.readouterr()
    assert "ratio reference/ours" in out
    assert err == ("error: --json /dev/full cannot be written (No space left on device): the figures above "
                   "stand\n")

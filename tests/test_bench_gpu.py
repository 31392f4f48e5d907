"""bench/bench_gpu.py at its --tiny sizes on the CPU: every row measured, every ratio computed,
the JSON summary printed and written; a failing torch.compile reported without stopping the run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_gpu

ROOT = Path(__file__).resolve().parent.parent
ROWS = {"seed_style", "project_default", "ceiling_default", "project_bf16_compile", "ceiling_bf16_compile"}
RATIOS = {"default_vs_seed", "best_vs_seed", "default_vs_ceiling", "bf16_compile_vs_ceiling"}
# the image folder's own rows: where the images come from (a disk cache, the files decoded while
# loading or on the device)
JPEG_ROWS = {"project_disk", "project_files", "project_decode_device"}
JPEG_RATIOS = {"disk_vs_ceiling", "files_vs_ceiling", "decode_device_vs_files"}
OWN_ROWS = {"cifar": {"project_bf16_graphs"}, "jpeg": JPEG_ROWS, "embedded": set()}  # rows of one configuration


def summary_of(stdout: str) -> dict:
    assert bench_gpu.JSON_MARKER in stdout, stdout[-2000:]
    return json.loads(stdout.split(bench_gpu.JSON_MARKER, 1)[1])


@pytest.mark.slow  # about a minute and a half: every row of the benchmark, trained and timed
def test_tiny_run_on_the_cpu_measures_every_row(tmp_path):
    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--device", "cpu",
                           "--json", str(out), "--data_root", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = summary_of(done.stdout)
    assert json.loads(out.read_text()) == summary
    assert summary["torch"] and summary["device"].startswith("CPU") and summary["tiny"]
    assert set(summary["configs"]) == {"cifar", "jpeg", "embedded"}
    for name, config in summary["configs"].items():
        assert set(config["rows"]) == ROWS | OWN_ROWS[name]
        for key, row in config["rows"].items():
            assert "error" not in row, (name, key, row)
            assert row["images_per_s"] > 0 and row["images"] > 0, (name, key, row)
        assert config["rows"]["project_default"]["cache"] == "memory", name  # the defaults hold the images in memory
        ratios = RATIOS | (JPEG_RATIOS if name == "jpeg" else set())
        assert set(config["ratios"]) == ratios | {"best_row"}
        assert all(config["ratios"][ratio] > 0 for ratio in ratios), (name, config["ratios"])
    jpeg = summary["configs"]["jpeg"]["rows"]
    assert (jpeg["project_disk"]["cache"], jpeg["project_files"]["cache"], jpeg["project_decode_device"]["cache"]) \
        == ("disk", "off", "off")
    assert summary["configs"]["cifar"]["targets"] == {"best_vs_seed": 4.0}
    assert set(summary["configs"]["jpeg"]["targets"]) == {"default_vs_ceiling", "bf16_compile_vs_ceiling",
                                                          "best_vs_seed"}
    rows = [line for line in done.stdout.splitlines() if " img/s  (" in line]
    assert len(rows) == 19  # one line per measurement
    assert "target 4x:" in done.stdout and "target 0.85x:" in done.stdout and "target 2.5x:" in done.stdout
    assert not (tmp_path / "bench_gpu_data").exists()  # the written data are removed without --keep


def test_a_failing_compile_is_one_line_and_the_other_rows_go_on(tmp_path, capsys):
    status = bench_gpu.main(["--tiny", "--device", "cpu", "--configs", "embedded", "--compile_backend",
                             "no_such_backend", "--data_root", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0  # only the compiled rows failed
    rows = summary_of(printed)["configs"]["embedded"]["rows"]
    for key in ("project_bf16_compile", "ceiling_bf16_compile"):
        assert "no_such_backend" in rows[key]["error"]
        assert "\n" not in rows[key]["error"]
    assert all(rows[key]["images_per_s"] > 0 for key in ("seed_style", "project_default", "ceiling_default"))
    assert printed.count("FAILED:") == 2


def test_class_folders_hold_what_the_registry_split_keeps_for_training():
    from data.datasets import _train_count

    for train in range(1, 400):
        n = bench_gpu.files_for(train)
        assert _train_count(n) == train and _train_count(n + 1) > train, train

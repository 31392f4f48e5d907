"""What each call imports: importing torchvision takes seconds here, so the main job (the metric
on the demo checkpoints, a CIFAR ResNet of the project's own) must not import it, and a call
that builds one of torchvision's models must."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs cal_transferability.py as a script would, then prints the torchvision modules loaded.
PROBE = """
import json, runpy, sys
sys.argv = ["cal_transferability.py", *json.loads(sys.argv[1])]
try:
    runpy.run_path("cal_transferability.py", run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "torchvision")))
"""


def loaded_torchvision_modules(argv: list[str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_main_job_does_not_import_torchvision(tmp_path):
    outputs = ["--json", str(tmp_path / "t.json"), "--csv", str(tmp_path / "t.csv"), "--fig", str(tmp_path / "t.png")]
    assert loaded_torchvision_modules(outputs) == []
    assert json.loads((tmp_path / "t.json").read_text())  # the job ran and wrote its results


def test_measuring_a_torchvision_architecture_from_random_init_imports_it(tmp_path):
    import torch

    from models import build_model
    from utils import save_state_dict

    torch.manual_seed(0)
    theta_a = build_model("resnet18", num_classes=10).state_dict()
    theta_b = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in theta_a.items()}
    save_state_dict(theta_a, tmp_path / "a.pth")
    save_state_dict(theta_b, tmp_path / "b.pth")
    argv = ["-r", "random:0", "-a", str(tmp_path / "a.pth"), "-b", str(tmp_path / "b.pth"), "--no_fig",
            "--json", str(tmp_path / "t.json")]
    assert "torchvision" in loaded_torchvision_modules(argv)

"""The README's offline walkthrough, command for command, at a reduced size: it runs end to
end, writes only into its own folder, and gives a T that means something (no problem named,
no layer dominating the mean)."""
from __future__ import annotations

import importlib
import json
import math
import re
import shlex
import statistics
from pathlib import Path

import pytest

from utils import run_cli

ROOT = Path(__file__).resolve().parent.parent
FOLDER = "walkthrough/"
# What shrinks the walkthrough to a test: fewer epochs, fewer classes and images.
REDUCED = {
    "pretrain_on_ImageNet.py": {"--max_epoch": "6", "--lr_step": "2",
                                "--dataset": "synthetic:source,classes=20,n=40,n_val=10,var=0.5"},
    "finetune.py": {"--max_epoch": "4", "--dataset": "synthetic:classes=5,n=30,n_val=20,var=1.0,gap=0.5"},
}


def walkthrough_commands(readme: str) -> list[list[str]]:
    """The commands of the README's offline walkthrough: the code block after the paragraph
    that starts with "Offline, on the synthetic benchmark", continuation lines joined."""
    start = readme.index("Offline, on the synthetic benchmark")
    lines = readme[start:].splitlines()
    block: list[str] = []
    for line in lines[1:]:
        if line.startswith("    "):
            block.append(line.strip())
        elif block:
            break
    commands = " ".join(block).replace("\\ ", " ").split("python ")[1:]
    return [shlex.split(command) for command in commands]


def reduced(command: list[str], folder: Path) -> list[str]:
    script, *argv = command
    changes = REDUCED.get(script, {})
    out = []
    for i, item in enumerate(argv):
        if i and argv[i - 1] in changes:
            item = changes[argv[i - 1]]
        out.append(item.replace(FOLDER, f"{folder}/"))
    return [script, *out]


def test_the_walkthrough_block_is_what_the_test_runs():
    commands = walkthrough_commands((ROOT / "README.md").read_text())
    assert [c[0] for c in commands] == ["pretrain_on_ImageNet.py", "finetune.py", "cal_transferability.py"]
    for command in commands:
        paths = [item for item in command[1:] if item.endswith((".pth", ".json", ".png"))]
        assert paths and all(path.startswith(FOLDER) for path in paths), command  # outputs in a folder of their own
        for flag in REDUCED.get(command[0], {}):
            assert flag in command, (command[0], flag)


@pytest.mark.slow
def test_the_walkthrough_at_a_reduced_size_gives_a_meaningful_t(tmp_path, capsys):
    folder = tmp_path / "walkthrough"
    for command in walkthrough_commands((ROOT / "README.md").read_text()):
        script, *argv = reduced(command, folder)
        module = importlib.import_module(re.sub(r"\.py$", "", script))
        assert run_cli(module.main, argv) == 0, capsys.readouterr().err
    document = json.loads((folder / "transferability.json").read_text())
    # (so short a pre-training may stay near its initialisation: document["warnings"] is not judged)
    [result] = document["results"]
    assert result["warnings"] == []
    values = [layer["transferability"] for layer in result["layers"] if layer["status"] == "layer"]
    assert all(v is not None and math.isfinite(v) for v in values)
    assert max(values) <= 20 * statistics.median(values)
    assert (folder / "transferability.png").stat().st_size > 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "a.last.pth", "a.log.jsonl", "a.pth", "b.last.pth", "b.log.jsonl", "b.pth", "r.pth",
        "transferability.json", "transferability.png"]

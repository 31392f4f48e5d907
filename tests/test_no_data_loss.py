"""Issue 20, classes 1-3: no output of a call replaces a file the call reads or another of
its outputs (compared by identity: links, other spellings), one lock per file a training run
writes, and temporary files that a killed writer leaves are removed by the next write."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import analyze
import cal_transferability
import finetune
import pretrain_on_ImageNet
from engine.checkpoint import RunLock, lock_file
from cli_helpers import FAST, TARGET, refused
from utils import run_cli, write_atomically

REPO = Path(__file__).resolve().parents[1]
SOURCE = "synthetic:source,classes=6,n=12,n_val=4,size=16"


def snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def spellings(path: Path, tmp_path: Path) -> list[str]:
    """Other names of one file: another spelling of its path, a symbolic link, a hard link."""
    link, hard = tmp_path / f"link_{path.name}", tmp_path / f"hard_{path.name}"
    link.symlink_to(path)
    os.link(path, hard)
    dotted = f"{path.parent}/../{path.parent.name}/./{path.name}"
    return [dotted, str(link), str(hard)]


# ---------------------------------------------------------------- 1. outputs never replace inputs


@pytest.mark.parametrize("flag", ["--json", "--csv", "--fig"])
@pytest.mark.parametrize("role", ["-r", "-a", "-b"])
def test_cal_transferability_never_writes_over_a_checkpoint_it_reads(capsys, tmp_path, tiny_trio, flag, role):
    target = {"-r": tiny_trio.r, "-a": tiny_trio.a, "-b": tiny_trio.b}[role]
    before = snapshot(tmp_path)
    argv = ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b", str(tiny_trio.b), flag, str(target)]
    if flag != "--fig":
        argv.append("--no_fig")
    refused(capsys, cal_transferability.main, argv, f"{flag} {target}", f"{role} {target}", "which this command reads")
    assert snapshot(tmp_path) == before


def test_an_input_is_recognised_through_links_and_other_spellings(capsys, tmp_path, tiny_trio):
    (tmp_path / "links").mkdir()
    before = snapshot(tiny_trio.a.parent)
    for spelling in spellings(tiny_trio.a, tmp_path / "links"):
        argv = ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b", str(tiny_trio.b), "--json", spelling, "--no_fig"]
        refused(capsys, cal_transferability.main, argv, "--json", f"-a {tiny_trio.a}", "which this command reads")
    assert snapshot(tiny_trio.a.parent) == before


def test_analyze_subcommands_never_write_over_what_they_read(capsys, tmp_path, tiny_trio):
    table = tmp_path / "table.csv"
    table.write_text((REPO / "data" / "paper_table.csv").read_text())
    result = tmp_path / "result.json"
    assert run_cli(cal_transferability.main, ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b", str(tiny_trio.b),
                                              "--json", str(result), "--no_fig"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    cases = [
        (["regress", str(table), "--json", str(table)], "table"),
        (["regress", str(table), "--fig", str(table)], "table"),
        (["figure", str(result), "--out", str(result)], "RESULT.json"),
        (["estimators", "--dataset", "synthetic:classes=3,n=8", "-a", str(tiny_trio.a), "--json", str(tiny_trio.a)],
         "-a"),
        (["stats", "--dataset", "synthetic:classes=3,n=8", "--features", "pixels", "--transferability", str(result),
          "--csv", str(result)], "--transferability"),
    ]
    for argv, role in cases:
        refused(capsys, analyze.main, argv, "which this command reads", role)
    assert snapshot(tmp_path) == before


def test_training_never_writes_over_its_start_or_another_runs_resume_file(capsys, tmp_path):
    r, a = tmp_path / "r.pth", tmp_path / "a.pth"
    assert run_cli(pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "-r", str(r), "-a", str(a)]) == 0
    capsys.readouterr()
    last = tmp_path / "a.last.pth"
    before = snapshot(tmp_path)
    # finetune: -b over -a in another spelling, -b whose run files include --resume, -b = its --resume
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(a), "-b", f"{tmp_path}/./a.pth"], "-a")
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(a), "-b", str(tmp_path / "b.pth"),
                                    "--resume", str(tmp_path / "b.log.jsonl")], "--resume", "which this command reads")
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(a), "-b", str(last), "--resume", str(last),
                                    "--overwrite"], "--resume", "which this command reads")
    # pretrain: -a whose run files are the --resume of another run
    refused(capsys, pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "-r", str(tmp_path / "r2.pth"), "-a",
                                                str(tmp_path / "x.pth"), "--resume", str(tmp_path / "x.pth")],
            "--resume", "which this command reads")
    assert snapshot(tmp_path) == before
    # resuming a run from its own .last.pth is what --resume is for
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(a), "-b", str(tmp_path / "b.pth")]) == 0
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(a), "-b", str(tmp_path / "b.pth"),
                                   "--resume", str(tmp_path / "b.last.pth")]) == 0


# ------------------------------------------------------- 2. two outputs of one call on one path


@pytest.mark.parametrize("first,second", [("--json", "--csv"), ("--csv", "--fig"), ("--json", "--fig")])
def test_two_outputs_of_cal_transferability_on_one_path_are_refused(capsys, tmp_path, tiny_trio, first, second):
    out = tmp_path / "out.png"
    argv = ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b", str(tiny_trio.b), first, str(out),
            second, f"{tmp_path}/../{tmp_path.name}/out.png"]
    refused(capsys, cal_transferability.main, argv, "name the same file", "written twice", first, second)
    assert not out.exists()


def test_two_outputs_of_analyze_and_of_training_on_one_path_are_refused(capsys, tmp_path):
    table = REPO / "data" / "paper_table.csv"
    out = tmp_path / "fit.png"
    refused(capsys, analyze.main, ["regress", str(table), "--json", str(out), "--fig", str(out)], "written twice")
    refused(capsys, pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "-r", str(tmp_path / "x.log.jsonl"), "-a",
                                                str(tmp_path / "x.pt")], "written twice", "-r", "-a")
    refused(capsys, pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "-r", str(tmp_path / "a.last.pth"), "-a",
                                                str(tmp_path / "a.pth")], "written twice")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- 3. one lock per file written


@pytest.mark.parametrize("holder_b,other_b", [("x.pth", "x.pt"), ("x.pth", "x"), ("x.pth", "x.last.pth"),
                                              ("x.pth", "sub/../x.pth")])
def test_runs_that_would_write_one_file_hold_one_lock(capsys, tmp_path, holder_b, other_b):
    """The lock is on every file a run writes: -b x.pth and -b x.pt both write x.last.pth and
    x.log.jsonl, -b x.last.pth writes the other's .last.pth as its best weights."""
    from engine.checkpoint import run_files

    (tmp_path / "sub").mkdir()
    r, a = tmp_path / "r.pth", tmp_path / "a.pth"
    assert run_cli(pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "-r", str(r), "-a", str(a)]) == 0
    capsys.readouterr()
    holder = RunLock({path: "-b" for path in run_files(tmp_path / holder_b)})
    holder.acquire()
    try:
        refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(a), "-b", str(tmp_path / other_b)],
                "another run is writing this file", f"pid {os.getpid()}")
    finally:
        holder.release()
    assert not (tmp_path / "x.last.pth").exists() and not list(tmp_path.glob(".*.lock"))


def test_a_lock_removed_at_release_is_never_held_twice(tmp_path):
    """The holder removes its lock file before closing it; a process that opened the old file
    meanwhile must not count its lock on the removed file as the lock."""
    import fcntl

    out = tmp_path / "b.pth"
    first = RunLock({out: "-b"})
    first.acquire()
    stale = open(lock_file(out), "a+")  # opened while the first holds it
    first.release()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a lock on the removed file succeeds...
    second = RunLock({out: "-b"})
    second.acquire()  # ...and does not stop a new run, which locks the file now at the path
    try:
        third = RunLock({out: "-b"})
        with pytest.raises(Exception, match="another run is writing"):
            third.acquire()
    finally:
        second.release()
        stale.close()


def test_lock_files_of_long_names_fit_the_file_system(tmp_path):
    out = tmp_path / ("n" * 250 + ".pth")
    lock = RunLock({out: "-b"})
    lock.acquire()
    lock.release()
    assert len(os.fsencode(lock_file(out).name)) <= 255


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """kill -9 during a write leaves .NAME.PID-RANDOM.tmp; the next write of that name in the
    folder removes it (its process is gone); a live writer's temporary file is kept."""
    target = tmp_path / "out.json"
    code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); from utils import write_atomically; "
            "from pathlib import Path\n"
            "def slow(handle):\n    handle.write(b'partial'); handle.flush(); print('writing', flush=True); "
            "time.sleep(60)\n"
            "write_atomically(Path(sys.argv[2]), slow)")
    writer = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    live = list(tmp_path.glob(".out.json.*.tmp"))
    assert len(live) == 1
    write_atomically(tmp_path / "other.json", lambda h: h.write(b"{}"))
    write_atomically(target, lambda h: h.write(b"{}"))  # the writer still runs: its file stays
    assert live[0].exists()
    writer.kill()
    writer.wait()
    write_atomically(target, lambda h: h.write(b"[]"))
    assert not live[0].exists() and target.read_bytes() == b"[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "out.json"]


def test_training_never_writes_over_a_file_of_its_data_set(capsys, tmp_path):
    """The images (and list files) a run reads are inputs too: an output that is one of them,
    under any name (the file itself, a symbolic or hard link outside the folder, a link to its
    class folder), is refused with --overwrite, for --dataset imagefolder:PATH and --data_dir."""
    from test_datasets import make_imagefolder

    folder = tmp_path / "photos"
    make_imagefolder(folder)
    image = folder / "dogs" / "003.jpeg"
    (tmp_path / "elsewhere").mkdir()
    hard = tmp_path / "elsewhere" / "weights.pth"
    os.link(image, hard)
    (tmp_path / "classes").symlink_to(folder / "dogs")
    a = tmp_path / "a.pth"
    assert run_cli(pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "-r", str(tmp_path / "r.pth"), "-a",
                                               str(a)]) == 0
    capsys.readouterr()
    before = snapshot(folder)
    for dataset in ([f"imagefolder:{folder}"], ["imagefolder", "--data_dir", str(folder)]):
        for out in (image, hard, tmp_path / "classes" / "003.jpeg"):
            refused(capsys, finetune.main, ["--dataset", *dataset, *FAST, "--img_size", "16", "-a", str(a),
                                            "-b", str(out), "--overwrite"],
                    f"-b {out}", "which this command reads", str(folder))
        refused(capsys, pretrain_on_ImageNet.main, ["--dataset", *dataset, *FAST, "--img_size", "16", "-r",
                                                    str(folder / "cats" / "000.png"), "-a", str(tmp_path / "x.pth"),
                                                    "--overwrite"], "-r", "which this command reads")
    # analyze.py's subcommands read the same folders (--dataset imagefolder:PATH, --data_dir, --source_dir)
    cases = [["estimators", "--dataset", f"imagefolder:{folder}", "-a", str(a), "--json", str(hard)],
             ["estimators", "--dataset", "imagefolder", "--data_dir", str(folder), "-a", str(a), "--csv", str(image)],
             ["stats", "--dataset", SOURCE, "--source", "imagefolder", "--source_dir", str(folder), "-a", str(a),
              "--json", str(hard)]]
    for argv in cases:
        refused(capsys, analyze.main, argv, "which this command reads", str(folder))
    assert snapshot(folder) == before
    # an output beside the images that is not one of them is written as before
    assert run_cli(finetune.main, ["--dataset", f"imagefolder:{folder}", *FAST, "--img_size", "16", "-a", str(a),
                                   "-b", str(folder / "b.pth")]) == 0

"""Safe checkpoint reading (utils.load_state_dict_safely) and atomic writing (commit_outputs)."""
from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import pickle
import posix
import random
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from typing import Callable

import pytest
import torch

from models import build_model
from utils import UserError, check_writable, commit_outputs, load_state_dict_safely, save_state_dict


def assert_same_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


# --------------------------------------------------------------------------- accepted layouts


def test_plain_state_dict_round_trips(tmp_path, tiny_resnet20_state):
    path = tmp_path / "plain.pth"
    torch.save(tiny_resnet20_state, path)
    assert_same_tensors(load_state_dict_safely(path), tiny_resnet20_state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_state_dict_nested_in_a_training_checkpoint(tmp_path, tiny_resnet20_state, wrapper):
    path = tmp_path / "train.pth.tar"
    optimizer = {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"epoch": 3, wrapper: tiny_resnet20_state, "optimizer": optimizer, "best_acc": 0.9}, path)
    assert_same_tensors(load_state_dict_safely(path), tiny_resnet20_state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, tiny_resnet20_state, prefix):
    path = tmp_path / "prefixed.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in tiny_resnet20_state.items()}}, path)
    loaded = load_state_dict_safely(path)
    assert_same_tensors(loaded, tiny_resnet20_state)
    # The stripped dict loads into the model it came from.
    build_model("resnet20", 10).load_state_dict(loaded)


def test_legacy_non_zip_checkpoint_loads(tmp_path, tiny_resnet20_state):
    path = tmp_path / "legacy.pth"
    torch.save(tiny_resnet20_state, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)  # really the pre-zip format, which cannot be memory-mapped
    assert_same_tensors(load_state_dict_safely(path), tiny_resnet20_state)


def test_save_state_dict_round_trips(tmp_path, tiny_resnet20_state):
    path = tmp_path / "sub" / "saved.pth"
    save_state_dict(tiny_resnet20_state, path)
    assert_same_tensors(load_state_dict_safely(path), tiny_resnet20_state)
    assert sorted(os.listdir(path.parent)) == ["saved.pth"]


def test_safetensors_file_loads(tmp_path, tiny_resnet20_state):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(tiny_resnet20_state, str(path))
    loaded = load_state_dict_safely(path)
    assert sorted(loaded) == sorted(tiny_resnet20_state)
    for key, tensor in tiny_resnet20_state.items():
        assert torch.equal(loaded[key], tensor), key


def test_safetensors_without_the_package_is_a_user_error(tmp_path, tiny_resnet20_state, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(tiny_resnet20_state, str(path))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError) as info:
        load_state_dict_safely(path)
    message = str(info.value)
    assert str(path) in message
    assert "pip install safetensors" in message


def test_legacy_densenet_key_names_are_renamed(tmp_path):
    old = {
        "features.conv0.weight": torch.randn(64, 3, 7, 7),
        "features.denseblock1.denselayer1.norm.1.weight": torch.randn(64),
        "features.denseblock1.denselayer1.norm.1.running_mean": torch.randn(64),
        "features.denseblock1.denselayer1.conv.1.weight": torch.randn(128, 64, 1, 1),
        "features.denseblock1.denselayer1.norm.2.bias": torch.randn(128),
        "features.denseblock1.denselayer1.conv.2.weight": torch.randn(32, 128, 3, 3),
        "features.denseblock4.denselayer16.conv.2.weight": torch.randn(32, 128, 3, 3),
        "classifier.weight": torch.randn(10, 1024),
    }
    path = tmp_path / "densenet_legacy.pth"
    torch.save(old, path)
    loaded = load_state_dict_safely(path)
    assert list(loaded) == [
        "features.conv0.weight",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.norm1.running_mean",
        "features.denseblock1.denselayer1.conv1.weight",
        "features.denseblock1.denselayer1.norm2.bias",
        "features.denseblock1.denselayer1.conv2.weight",
        "features.denseblock4.denselayer16.conv2.weight",
        "classifier.weight",
    ]
    for (_, before), after in zip(old.items(), loaded.values()):
        assert torch.equal(before, after)
    # Every renamed key is one that torchvision's DenseNet-121 has today.
    with torch.device("meta"):
        current = build_model("densenet121", 10).state_dict()
    assert set(loaded) <= set(current)


# ------------------------------------------------------------------------ refused: unsafe pickles


class CreatesFile:
    """Unpickling this object creates ``marker``: the payload of a malicious checkpoint."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_the_malicious_payload_is_live(tmp_path):
    """Control for the tests below: unrestricted unpickling does run the payload."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump-2", "pickle.dump-4"])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"conv1.weight": torch.zeros(2, 2), "hook": CreatesFile(marker)}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(CreatesFile(marker), handle, protocol=int(writer[-1]))
    with pytest.raises(UserError) as info:
        load_state_dict_safely(path)
    assert str(path) in str(info.value)
    if writer == "pickle.dump-4":
        # torch's restricted unpickler stops at protocol 4's FRAME opcode, before any object
        # is built: a plain pickle that is not a torch checkpoint.
        assert "not a PyTorch checkpoint" in str(info.value)
    else:
        assert "unsafe unpickling" in str(info.value)
    assert not marker.exists()


def test_pickled_whole_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(build_model("resnet20", 10), path)
    with pytest.raises(UserError, match="unsafe unpickling") as info:
        load_state_dict_safely(path)
    assert str(path) in str(info.value)


# ------------------------------------------- refused: payloads that would run code, of every kind


class Calls:
    """Unpickling this object calls ``func(*args)``."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class MainEvil:
    """A class of the script that saved the file (pickled as ``__main__.MainEvil``, see
    :func:`class_in_main`); rebuilding it touches ``marker``."""

    def __init__(self, marker: pathlib.Path, fire: bool = False) -> None:
        self.marker = marker
        if fire:
            pathlib.Path(marker).touch()

    def __reduce__(self):
        return (MainEvil, (self.marker, True))


@contextlib.contextmanager
def class_in_main(cls: type):
    """While inside, ``cls`` is ``__main__.<name>`` for pickle, as a class of a script is."""
    main, module = sys.modules["__main__"], cls.__module__
    cls.__module__ = "__main__"
    setattr(main, cls.__name__, cls)
    try:
        yield
    finally:
        cls.__module__ = module
        delattr(main, cls.__name__)


def _touch_code(marker: pathlib.Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _save_zip_with_data_pkl(path: pathlib.Path, payload: object) -> None:
    """A zip-format torch file (written by torch.save) whose data.pkl is replaced by ``payload``."""
    torch.save({"conv1.weight": torch.zeros(2, 2)}, path)
    with zipfile.ZipFile(path) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    name = next(n for n in members if n.endswith("/data.pkl"))
    members[name] = pickle.dumps(payload, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for member, data in members.items():
            target.writestr(member, data)


# name: (write(path, marker), the code the refusal must name). Each payload creates ``marker``
# when it runs (test_every_unsafe_payload_is_live); none may run when the file is read.
UNSAFE_FILES = {
    "os.system": (lambda p, m: torch.save({"state_dict": Calls(os.system, f"touch {shlex.quote(str(m))}")}, p),
                  "os.system"),
    "subprocess.Popen": (lambda p, m: torch.save({"state_dict": Calls(subprocess.Popen, ["touch", str(m)])}, p),
                         "subprocess.Popen"),
    "builtins.exec": (lambda p, m: torch.save({"state_dict": Calls(exec, _touch_code(m))}, p), "builtins.exec"),
    "builtins.eval": (lambda p, m: torch.save({"state_dict": Calls(eval, _touch_code(m))}, p), "builtins.eval"),
    "posix.system": (lambda p, m: torch.save({"model": Calls(posix.system, f"touch {shlex.quote(str(m))}")}, p),
                     "os.system"),
    "__main__ class": (lambda p, m: torch.save({"state_dict": MainEvil(m)}, p), "__main__.MainEvil"),
    "nested in a list": (lambda p, m: torch.save({"state_dict": {"conv1.weight": torch.zeros(2, 2)},
                                                 "hooks": [1, [Calls(exec, _touch_code(m))]]}, p), "builtins.exec"),
    "raw pickle protocol 0": (lambda p, m: p.write_bytes(pickle.dumps(Calls(os.system, f"touch {m}"), protocol=0)),
                              "os.system"),
    "raw pickle protocol 2": (lambda p, m: p.write_bytes(pickle.dumps(Calls(subprocess.Popen, ["touch", str(m)]),
                                                                      protocol=2)), "subprocess.Popen"),
    "zip data.pkl": (lambda p, m: _save_zip_with_data_pkl(p, {"w": Calls(eval, _touch_code(m))}), "builtins.eval"),
}


def write_unsafe_file(directory: pathlib.Path, kind: str) -> tuple[pathlib.Path, pathlib.Path, str]:
    """``(file, marker, code it would run)`` for one of :data:`UNSAFE_FILES`."""
    path, marker = directory / "evil.pth", directory / "payload_ran"
    write, code = UNSAFE_FILES[kind]
    with class_in_main(MainEvil):
        write(path, marker)
    return path, marker, code


@pytest.mark.parametrize("kind", sorted(UNSAFE_FILES))
def test_every_unsafe_payload_is_live(tmp_path, kind):
    """Control: read without the restriction, each file does run its payload."""
    path, marker, _ = write_unsafe_file(tmp_path, kind)
    with class_in_main(MainEvil), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's FutureWarning about weights_only=False
        if kind.startswith("raw pickle"):
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
    deadline = time.monotonic() + 10  # subprocess.Popen runs touch in the background
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(UNSAFE_FILES))
def test_unsafe_payload_is_refused_by_name_before_it_runs(tmp_path, kind):
    path, marker, code = write_unsafe_file(tmp_path, kind)
    with pytest.raises(UserError) as info:
        load_state_dict_safely(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: loading it would run code from {code} (unsafe unpickling)")
    assert "re-save" in message and "Weights only load failed" not in message and "\n" not in message
    time.sleep(0.05)
    assert not marker.exists()


# ----------------------------------------------------------------------- refused: not checkpoints


def _random_bytes(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(size))


# Contents that are no checkpoint. Several make torch's parsers raise IndexError or
# struct.error rather than the usual RuntimeError/EOFError (b"." and the text pop an
# empty stack, b"J\x01" is a truncated 4-byte integer); all must come out as a UserError.
NOT_CHECKPOINTS = {
    "empty": b"",
    "text": b"epoch: 3\nlr: 0.1\n",
    "stop_on_empty_stack": b".",
    "pop_empty_stack": b"0",
    "tuple3_on_empty_stack": b"\x853",
    "short_int": b"J\x01",
    "random_2": _random_bytes(2, 64),
    "random_20": _random_bytes(20, 1024),
    "random_91": _random_bytes(91, 1024),
    "all_bytes": bytes(range(256)) * 4,
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_file_that_is_no_checkpoint_is_a_user_error(tmp_path, name):
    path = tmp_path / f"{name}.pth"
    path.write_bytes(NOT_CHECKPOINTS[name])
    with pytest.raises(UserError) as info:
        load_state_dict_safely(path)
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_one_byte_corruption_of_a_legacy_checkpoint_loads_or_is_a_user_error(tmp_path):
    """A damaged pre-zip file makes torch raise IndexError, TypeError, AttributeError or
    AssertionError depending on the byte; none of them may escape as a traceback."""
    source = tmp_path / "small.pth"
    torch.save({"w": torch.arange(4.0)}, source, _use_new_zipfile_serialization=False)
    data = source.read_bytes()
    path = tmp_path / "corrupt.pth"
    outcomes = {"loaded": 0, "refused": 0}
    for offset in range(len(data)):
        for value in (16, 46, 74, 93):
            corrupt = bytearray(data)
            corrupt[offset] = value
            path.write_bytes(bytes(corrupt))
            try:
                load_state_dict_safely(path)
                outcomes["loaded"] += 1
            except UserError as err:
                assert str(path) in str(err)
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0  # both kinds of damage were met


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint_is_a_user_error(tmp_path, tiny_resnet20_state, legacy):
    full = tmp_path / "full.pth"
    torch.save(tiny_resnet20_state, full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 10):
        path = tmp_path / f"truncated_{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(UserError) as info:
            load_state_dict_safely(path)
        assert str(path) in str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    path = tmp_path / "nowhere" / "model.pth"
    with pytest.raises(UserError, match="no such file") as info:
        load_state_dict_safely(path)
    assert str(path) in str(info.value)


def test_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="directory") as info:
        load_state_dict_safely(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", [{"epoch": 3}, {"state_dict": {"epoch": 3}}, [1, 2, 3], 7])
def test_checkpoint_without_tensors_is_a_user_error(tmp_path, content):
    path = tmp_path / "no_tensors.pth"
    torch.save(content, path)
    with pytest.raises(UserError, match="no tensors") as info:
        load_state_dict_safely(path)
    assert str(path) in str(info.value)


def test_garbage_safetensors_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(_random_bytes(5, 100))
    with pytest.raises(UserError) as info:
        load_state_dict_safely(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------- writing


def _writer(text: str):
    return lambda handle: handle.write(text)


def _failing_writer(handle):
    handle.write(b"half of it" if "b" in handle.mode else "half of it")
    raise RuntimeError("disk on fire")


def test_commit_outputs_writes_every_file(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "new" / "b.csv"
    a.write_text("old")
    commit_outputs([(a, _writer("new a"), "w"), (b, lambda h: h.write(b"\x00bytes"), "wb")])
    assert a.read_text() == "new a"
    assert b.read_bytes() == b"\x00bytes"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "new"]


@pytest.mark.parametrize("failing_index", [0, 1, 2])
def test_commit_outputs_changes_nothing_when_a_writer_fails(tmp_path, failing_index):
    existing, fresh, other = tmp_path / "results.json", tmp_path / "results.csv", tmp_path / "fig.png"
    existing.write_text("old content\n")
    writers = [(existing, _writer("new content"), "w"), (fresh, _writer("rows"), "w"),
               (other, lambda h: h.write(b"\x89PNG"), "wb")]
    path, _, mode = writers[failing_index]
    writers[failing_index] = (path, _failing_writer, mode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        commit_outputs(writers)
    assert existing.read_text() == "old content\n"
    assert not fresh.exists() and not other.exists()
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_check_writable_accepts_a_new_file_in_new_folders(tmp_path):
    path = tmp_path / "out" / "deeper" / "results.json"
    assert check_writable(path, "--json") == path
    assert not path.parent.exists()  # checking creates nothing


def test_check_writable_refuses_a_directory(tmp_path):
    with pytest.raises(UserError, match="directory") as info:
        check_writable(tmp_path, "--json")
    assert str(info.value).startswith(f"--json {tmp_path}")


@pytest.mark.parametrize("below", ["results.json", "sub/results.json"])
def test_check_writable_refuses_a_path_under_a_regular_file(tmp_path, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    path = blocker / below
    with pytest.raises(UserError) as info:
        check_writable(path, "--csv")
    message = str(info.value)
    assert message.startswith(f"--csv {path}")
    assert "not a directory" in message


# -------------------------------------------- writing: a full disk, /proc, /sys, read-only mounts


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_a_user_error_naming_the_path_and_nothing_is_written(tmp_path, monkeypatch):
    existing, fresh = tmp_path / "results.json", tmp_path / "results.csv"
    existing.write_text("old content\n")
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(UserError) as info:
        commit_outputs([(existing, _writer("new content"), "w"), (fresh, _writer("rows"), "w")])
    assert str(info.value) == f"{existing}: cannot write (No space left on device); nothing was written"
    assert existing.read_text() == "old content\n"
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_a_write_error_names_the_flag_when_the_caller_knows_it(tmp_path, monkeypatch):
    path = tmp_path / "fit.json"
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(UserError) as info:
        commit_outputs([(path, _writer("{}"), "w")], flags={path: "--json"})
    assert str(info.value).startswith(f"--json {path}: cannot write (No space left on device)")
    assert os.listdir(tmp_path) == []


class _FullDiskFile:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def test_save_state_dict_on_a_full_disk_is_a_user_error(tmp_path, monkeypatch, tiny_resnet20_state):
    """torch.save's own writes fail (the training loop's -b, .last.pth and log go this way)."""
    path = tmp_path / "b.pth"
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDiskFile(real_fdopen(fd, mode)))
    with pytest.raises(UserError) as info:
        save_state_dict(tiny_resnet20_state, path)
    assert str(info.value) == f"{path}: cannot write (No space left on device); nothing was written"
    assert os.listdir(tmp_path) == []


def test_a_failed_move_into_place_says_what_was_already_written(tmp_path, monkeypatch):
    first, second = tmp_path / "a.json", tmp_path / "b.csv"
    real_replace, calls = os.replace, []

    def replace_once(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(UserError) as info:
        commit_outputs([(first, _writer("a"), "w"), (second, _writer("b"), "w")])
    assert str(info.value) == f"{second}: cannot write (Input/output error); {first} was written"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


@pytest.mark.parametrize("path", ["/proc/x.json", "/proc/self/nonexistent_dir/x.json", "/sys/x.json"])
def test_check_writable_refuses_proc_and_sys_at_once(path):
    """os.access says yes to root for these; creating a file there fails."""
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        check_writable(path, "--json")
    assert str(info.value).startswith(f"--json {path}: cannot write files in ")
    assert "choose another path" in str(info.value)
    assert time.monotonic() - started < 1
    assert not os.path.exists(path)


def test_check_writable_refuses_a_read_only_file_system(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(UserError) as info:
        check_writable(tmp_path / "results.csv", "--csv")
    assert str(info.value) == (f"--csv {tmp_path / 'results.csv'}: cannot write files in {tmp_path} "
                               "(Read-only file system); choose another path")


def test_check_writable_leaves_no_probe_behind(tmp_path):
    (tmp_path / "old.json").write_text("x")
    for name in ("old.json", "new.json", "sub/new.json"):
        assert check_writable(tmp_path / name, "--json") == tmp_path / name
    assert os.listdir(tmp_path) == ["old.json"]


def test_check_writable_refuses_a_full_disk_before_any_work(tmp_path, monkeypatch):
    """A full disk still takes an empty file; the probe writes one byte, which it does not."""
    monkeypatch.setattr(os, "write", _disk_full)
    with pytest.raises(UserError) as info:
        check_writable(tmp_path / "b.pth", "-b")
    assert str(info.value) == (f"-b {tmp_path / 'b.pth'}: cannot write files in {tmp_path} "
                               "(No space left on device); choose another path")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # the probe is gone all the same


# ------------------------------------------------------------------------ non-regular files


@pytest.mark.parametrize("name", ["pipe.pth", "pipe.safetensors"])
def test_a_fifo_checkpoint_is_refused_without_waiting_for_a_writer(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    code = ("import sys; from utils import run_cli, load_state_dict_safely; "
            "sys.exit(run_cli(lambda argv: load_state_dict_safely(sys.argv[1])))")
    repo = pathlib.Path(__file__).resolve().parents[1]
    # before the fix torch.load opened the FIFO and waited forever: the timeout fails the test
    done = subprocess.run([sys.executable, "-c", code, str(fifo)], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert str(fifo) in lines[0] and "named pipe (FIFO)" in lines[0] and "not a regular file" in lines[0]


def test_a_device_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="character device, not a regular file"):
        load_state_dict_safely("/dev/null")


@pytest.mark.parametrize("argv", [["regress", "{fifo}"], ["figure", "{fifo}", "--out", "{tmp}/f.png"],
                                  ["stats", "--dataset", "synthetic", "--features", "pixels",
                                   "--transferability", "{fifo}"]])
def test_analyze_refuses_a_fifo_input_without_waiting_for_a_writer(tmp_path, argv):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    argv = [part.format(fifo=fifo, tmp=tmp_path) for part in argv]
    repo = pathlib.Path(__file__).resolve().parents[1]
    # before the fix json.loads(read_text()) and csv opened the FIFO and waited forever
    done = subprocess.run([sys.executable, "analyze.py", *argv], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert str(fifo) in lines[0] and "named pipe (FIFO)" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["pipe.json"]

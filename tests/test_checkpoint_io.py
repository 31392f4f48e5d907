"""Safe checkpoint reading (utils.load_state_dict_safely) and atomic writing (commit_outputs)."""
from __future__ import annotations

import os
import pathlib
import pickle
import random
import sys
import zipfile

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

"""Small helpers shared by every script: user errors, devices, safe checkpoint I/O.

Checkpoints are only ever read with ``torch.load(weights_only=True)``: a file that needs
arbitrary unpickling (a pickled ``nn.Module``, a custom class) is refused before any of its
code can run. Every file this project writes goes through :func:`commit_outputs`, so a crash
never leaves a half-written output behind.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import errno
import json
import math
import os
import pickle
import re
import signal
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

# Wrappers that training scripts put around a state dict, tried in this order.
STATE_DICT_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by DistributedDataParallel / DataParallel and torch.compile.
STATE_DICT_PREFIXES = ("module.", "_orig_mod.")
# torchvision's old DenseNet checkpoints name ``norm1`` as ``norm.1`` (and so on).
_LEGACY_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.+)$")


class UserError(Exception):
    """A problem the user can fix (bad path, flag or file). Scripts print it on one line
    and exit with status 2; it never produces a traceback."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's ``main`` and turn a :class:`UserError` into ``prog: error: ...`` + 2."""
    prog = Path(sys.argv[0]).name or "python"
    if getattr(signal.getsignal(signal.SIGINT), "while_starting", False):  # script_start's: imports are done
        signal.signal(signal.SIGINT, signal.default_int_handler)
    warnings.formatwarning = lambda msg, *args, **kwargs: f"warning: {msg}\n"
    warnings.simplefilter("always")  # one warning per fine-tuned checkpoint, not one per run
    for stream, real in ((sys.stdout, sys.__stdout__), (sys.stderr, sys.__stderr__)):
        if stream is real and stream is not None:  # file names that are not valid UTF-8 print as their bytes
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="surrogateescape")
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors (status 2) and --help (status 0)
        return exit_.code if isinstance(exit_.code, int) else 1
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: ran out of memory; use less data or smaller settings (a smaller batch, fewer or "
              "smaller images), or free memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return device


# ------------------------------------------------------------------- checkpoint reading


def _torch_load(path: Path) -> object:
    """``torch.load`` with the restricted unpickler, memory-mapped where the format allows
    (files in the legacy pre-zip format cannot be mapped and are read normally)."""
    for mmap in (True, False):
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not the user's concern
                warnings.simplefilter("ignore")
                return torch_load_file(path, mmap=mmap)
        except pickle.UnpicklingError as err:
            code = _refused_code(str(err))
            if code is not None:  # an object the restricted unpickler will not import or build
                raise UserError(
                    f"{path}: refused: loading it would run code from {code} (unsafe unpickling); only "
                    "plain tensors are read. If you trust the file, load it with torch.load(weights_only=False) "
                    "and re-save its state dict (torch.save(model.state_dict(), PATH))"
                ) from None
            raise UserError(f"{path}: not a PyTorch checkpoint ({_unpickler_reason(str(err))})") from None
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001
            # torch.load's parsers fail on a damaged file with almost any exception type
            # (RuntimeError, EOFError, KeyError, IndexError, struct.error, AssertionError...):
            # all of them mean the file is not a readable checkpoint.
            if not (mmap and "mmap" in str(err)):
                raise UserError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from None
    raise AssertionError("unreachable")


def torch_load_file(path: str | os.PathLike, mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)`` onto the CPU. torch's reader takes only paths it
    can encode as UTF-8: a file whose name is not valid UTF-8 is read through an open handle
    (which cannot be memory-mapped)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        with open(path, "rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


# How torch's weights-only unpickler names a global it refuses to import: one it does not
# allow, or one of a blocked module (os, posix, subprocess, sys...).
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")
# The lines torch wraps around the unpickler's own message.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _refused_code(message: str) -> str | None:
    """The function or class a refused checkpoint would have imported, in its Python 3
    name (``os.system``, ``builtins.exec``, ``subprocess.Popen``); None for other failures."""
    match = _REFUSED_GLOBAL.search(message)
    if not match:
        return None
    module, _, name = match.group(1).rpartition(".")
    if not module:  # torch strips "builtins."
        return f"builtins.{name}"
    # pickle protocol 2 writes Python 2 names (subprocess.Popen as commands.Popen)
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{'os' if module in ('posix', 'nt') else module}.{name}"  # os.system pickles as posix.system


def _unpickler_reason(message: str) -> str:
    """What torch's long weights-only message says went wrong, without its boilerplate."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    if match:
        return match.group(1).split(". ")[0].strip()[:160]
    lines = [line.strip() for line in message.splitlines()]
    reasons = [line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)]
    return (reasons or lines or ["unreadable"])[0][:160]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(
            f"{path}: reading .safetensors files needs the safetensors package "
            "(pip install safetensors)"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    """Find the tensor dict inside a loaded checkpoint; ``None`` when there is none.

    Accepts a plain state dict or one nested under ``state_dict`` / ``model`` /
    ``model_state_dict``; strips ``module.`` and ``_orig_mod.`` prefixes and renames
    torchvision's legacy DenseNet keys. Non-tensor entries are dropped.
    """
    for _ in range(3):  # a training checkpoint may nest once or twice
        if not isinstance(obj, Mapping):
            return None
        inner = next((obj[k] for k in STATE_DICT_WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in STATE_DICT_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        key = _LEGACY_DENSENET_KEY.sub(r"\1\2.\3", key)
        tensors[key] = value
    return tensors or None


def load_state_dict_safely(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU, safely.

    ``.pt``/``.pth``/``.pth.tar`` files go through ``torch.load(weights_only=True,
    mmap=True)``, so tensors are paged in only when used; ``.safetensors`` files through
    the safetensors package. Raises :class:`UserError` for anything a user can fix.
    """
    path = check_input_file(path, "a checkpoint file")
    if path.suffix == ".safetensors":
        obj: object = _load_safetensors(path)
    else:
        check_zip_checksums(path)
        obj = _torch_load(path)
    state_dict = unwrap_state_dict(obj)
    if state_dict is None:
        raise UserError(
            f"{path}: holds no tensors (a {type(obj).__name__}); expected a state dict, "
            "or a dict with one under 'state_dict' or 'model'"
        )
    return state_dict


def _crc32(data) -> int:
    """The zip format's CRC-32 of ``data``: python-isal's (about 7x faster here than zlib's,
    which is what keeps checking every byte cheap next to reading it), else zlib's."""
    try:
        from isal.isal_zlib import crc32
    except ImportError:
        from zlib import crc32
    return crc32(data)


def _zip_checksums_problem(path: Path) -> str | None:
    """What is wrong with the stored CRC-32 checksums of a zip-format checkpoint (None: they all
    match, or the file is not a zip). ``torch.load`` does not check them, so a flipped byte
    inside a tensor would otherwise be read as a different weight. The members' bytes are read
    through a memory map of the file (the pages ``torch.load(mmap=True)`` then maps again), not
    copied: the cost is the checksum's arithmetic."""
    import mmap
    import struct
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # the legacy format, or not a zip at all: torch.load decides
    with archive, open(path, "rb") as handle:
        members = archive.infolist()
        if any(member.compress_type != zipfile.ZIP_STORED for member in members):
            return _zip_checksums_by_reading(archive)  # not written by torch.save: read them the usual way
        try:
            view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # an empty or unmappable file
            return _zip_checksums_by_reading(archive)
        with view:
            for member in members:
                header = view[member.header_offset:member.header_offset + 30]
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    return f"{member.filename}: its local header is damaged"
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                start = member.header_offset + 30 + name_length + extra_length
                if start + member.compress_size > len(view):
                    return f"{member.filename}: the file ends inside it (truncated)"
                with memoryview(view)[start:start + member.compress_size] as data:
                    crc = _crc32(data)
                if crc != member.CRC:
                    return f"{member.filename}: bad CRC-32"
    return None


def _zip_checksums_by_reading(archive) -> str | None:
    """:func:`_zip_checksums_problem` for a zip whose members are compressed: each read whole."""
    import zipfile

    for member in archive.infolist():
        try:
            with archive.open(member) as handle:
                while handle.read(1 << 24):
                    pass
        except zipfile.BadZipFile as err:
            return f"{member.filename}: {_first_line(err)}"
        except (OSError, EOFError, ValueError, NotImplementedError) as err:
            return f"{member.filename}: unreadable ({_first_line(err)})"
    return None


def check_zip_checksums(path: str | os.PathLike, flag: str = "") -> None:
    """Refuse a checkpoint whose bytes do not match its stored checksums (a damaged copy)."""
    problem = _zip_checksums_problem(Path(path))
    if problem is not None:
        where = f"{flag} {path}" if flag else str(path)
        raise UserError(f"{where}: damaged: {problem} (its bytes do not match the checksum stored when it was "
                        "written); copy or write it again")


def check_weights_fit(state_dict: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                      source: str) -> None:
    """Refuse weights that loading would silently change or that no training can use: a tensor
    of another kind than the model's (integers, booleans or complex numbers for a floating-point
    weight, or the reverse), or a floating-point tensor holding NaN or Inf. Only the keys the
    model has are looked at; ``source`` names the file (and flag) in the message."""
    for key, own in model_state.items():
        theirs = state_dict.get(key)
        if theirs is None:
            continue
        if theirs.is_floating_point() != own.is_floating_point() or theirs.is_complex() or theirs.dtype == torch.bool:
            raise UserError(f"{source}: tensor {key} is {str(theirs.dtype).replace('torch.', '')}, where the model "
                            f"holds {str(own.dtype).replace('torch.', '')}; loading would cast it, so it is refused: "
                            "give a checkpoint whose weights are stored as such")
        if theirs.is_floating_point() and not bool(torch.isfinite(theirs).all()):
            raise UserError(f"{source}: tensor {key} holds NaN or Inf; the checkpoint is broken (no training "
                            "setting can fix it): give the weights from before it broke")


def check_input_file(path: str | os.PathLike, wanted: str) -> Path:
    """``path`` as a Path once it names an existing regular file; else :class:`UserError`
    naming it and what it is instead (``wanted``: what to give, e.g. "a CSV file"). A named
    pipe or device is refused before it is opened: reading one would wait forever."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise UserError(f"{path}: {_path_problem(path, err)}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory; give {wanted}")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: is {_file_kind(path)}, not a regular file; give {wanted}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: cannot be read (permission denied)")
    return path


def _path_problem(path: Path, err: OSError) -> str:
    """What is wrong with a path that cannot be looked at: ``no such file; check the path``,
    ``a name in it is longer than the file system allows``, ``is a loop of symbolic links``."""
    if err.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist; check the link"
        return "no such file; check the path"
    if err.errno == errno.ELOOP:
        return "is a loop of symbolic links (or one too deep to follow); check the links"
    if err.errno == errno.ENAMETOOLONG:
        return "a name in the path is longer than the file system allows (255 bytes); choose a shorter name"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory; check the path"
    if err.errno == errno.EACCES:
        return "cannot be reached (permission denied on a folder in the path)"
    return f"cannot be read ({_os_reason(err)})"


def read_json(path: str | os.PathLike, wanted: str) -> object:
    """The JSON document in ``path`` (``wanted``: what to give, for the messages); anything that
    is not one (not UTF-8, malformed, nested too deeply to read) is a :class:`UserError`."""
    path = check_input_file(path, wanted)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); give {wanted}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not a readable JSON file ({err}); give {wanted}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read (not {wanted}); give {wanted}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({_os_reason(err)})") from None


def _file_kind(path: Path) -> str:
    """``a named pipe (FIFO)``: what a path that is not a regular file or folder is."""
    mode = path.stat().st_mode
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "a special file")


# ------------------------------------------------------------------------ safe writing


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same resolved path (symbolic links followed, other
    spellings such as ``./x`` or ``d/../x`` too), or, when both exist, the same file on disk
    (hard links, bind mounts)."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):  # one of them does not exist (yet), or cannot be looked at
        return False


def run_files(best_path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The files of a training run whose best weights go to ``OUT.pth``: (``OUT.pth``,
    ``OUT.last.pth``, ``OUT.log.jsonl``). Here, not in :mod:`engine.checkpoint`, so that
    reading a run's files does not import the training code."""
    best = Path(best_path)
    stem = best.with_suffix("") if best.suffix else best
    return best, stem.with_name(stem.name + ".last.pth"), stem.with_name(stem.name + ".log.jsonl")


def check_distinct_files(outputs: Iterable[tuple[str | os.PathLike, str]],
                         inputs: Iterable[tuple[str | os.PathLike, str]] = ()) -> None:
    """Refuse, before anything is read or written, an output that is also another output of
    the call (one would replace the other) or any file the call reads (it would be destroyed).
    Each item is ``(path, how an error names it)``, e.g. ``("a.pth", "-a a.pth")``; paths are
    compared by identity (:func:`same_file`), whatever their spelling."""
    outputs, inputs = list(outputs), list(inputs)
    for i, (path, role) in enumerate(outputs):
        for other, other_role in outputs[i + 1:]:
            if same_file(path, other):
                raise UserError(f"{other_role} and {role} name the same file, which would be written twice; "
                                "give each its own path")
        for source, source_role in inputs:
            if same_file(path, source):
                raise UserError(f"{role} is the same file as {source_role}, which this command reads; writing it "
                                "would destroy that input: choose another path")


def check_not_in_folder(outputs: Iterable[tuple[str | os.PathLike, str]], folder: str | os.PathLike | None,
                        folder_role: str) -> None:
    """Refuse an output that is one of the files under ``folder`` (a data set's folder the call
    reads: images, label lists, batches), compared by identity as :func:`check_distinct_files`
    does. Only outputs that exist can be such a file, so a fresh run costs a ``stat`` per
    output; otherwise the folder is walked once (symbolic links to folders followed, each
    folder once), matching the inode the directory listing gives before any ``stat``."""
    if folder is None or not os.path.isdir(folder):
        return
    existing = {}
    for path, role in outputs:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            continue
        existing[(st.st_dev, st.st_ino)] = role
    if not existing:
        return
    inodes = {ino for _, ino in existing}
    seen, stack = set(), [os.fspath(folder)]
    while stack:
        current = stack.pop()
        try:
            st = os.stat(current)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(current))
        except OSError:
            continue  # the data set's loader says what is wrong with a folder it needs
        for entry in entries:
            try:
                linked = entry.is_symlink()
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                    continue
                if not linked and entry.inode() not in inodes:
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue
            role = existing.get((st.st_dev, st.st_ino))
            if role is not None:
                raise UserError(f"{role} is the same file as {entry.path} in {folder_role}, which this command "
                                "reads; writing it would destroy that input: choose another path")


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """Fail early (before any work) when ``path`` could not be written later.

    The nearest existing folder is probed by writing one byte to a temporary file in it (then
    removed): ``os.access`` says yes to root for /proc, /sys and read-only mounts, and a full
    disk still takes an empty file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise UserError(f"{flag} {path}: {_path_problem(path, err)}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{flag} {path}: is {_file_kind(path)}, not a regular file; choose another path")
    parent = path.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is not a directory; choose another path")
    if mode is not None and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: not writable (permission denied); choose another path")
    failure = _probe_folder(parent)
    if failure is not None:
        raise UserError(f"{flag} {path}: cannot write files in {parent} ({_os_reason(failure)}); choose another path")
    return path


# Temporary files are named ``.NAME.PID-RANDOM.tmp`` (NAME cut to this many bytes, so that a long
# file name still leaves room): a process killed while writing leaves one behind, and the next
# write in that folder removes those whose process is gone.
_TMP_NAME_BYTES = 96


def _temporary_prefix(name: str) -> str:
    """``.NAME.`` of the temporary files that stand in for ``name`` while it is written."""
    short = os.fsencode(name)[:_TMP_NAME_BYTES]
    return "." + os.fsdecode(short) + "."


def _make_temporary(folder: Path, name: str) -> tuple[int, str]:
    """A new temporary file in ``folder`` for ``name`` (its descriptor and path); stale ones
    that dead processes left for the same name are removed first."""
    prefix = _temporary_prefix(name)
    remove_stale_temporaries(folder, prefix)
    return tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=folder)


def remove_stale_temporaries(folder: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Remove the temporary files (``PREFIX*PID-RANDOM.tmp``) in ``folder`` whose writing
    process no longer runs on this machine; returns what was removed."""
    removed = []
    try:
        names = [name for name in os.listdir(folder) if name.startswith(prefix) and name.endswith(".tmp")]
    except OSError:
        return removed
    for name in names:
        match = re.search(r"\.(\d+)-[^.]*\.tmp$", name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, name))
            removed.append(Path(folder) / name)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):  # gone, or a number no process has
        return False
    return True


def _probe_folder(folder: Path) -> OSError | None:
    """Why a file cannot be written in ``folder`` (None: it can), found by writing one byte
    to a temporary file there, which is removed whatever happens."""
    try:
        fd, probe = _make_temporary(folder, "write-probe")
    except OSError as err:
        return err
    try:
        os.write(fd, b"\0")
    except OSError as err:
        return err
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a plain tensor dict atomically, in the format :func:`load_state_dict_safely` reads."""
    write_atomically(Path(path), lambda handle: torch.save(dict(state_dict), handle))


def commit_outputs(writers: Iterable[tuple[Path, Callable[[object], None], str]],
                   flags: Mapping[Path, str] | None = None, unchanged: str = "nothing was written") -> None:
    """Write several outputs so that either all of them appear or none changes.

    Each item is ``(path, write(handle), mode)``. All are written to temporary files first;
    only when every one succeeded are they moved into place. An ``OSError`` on the way (a
    full disk, a read-only mount) is a :class:`UserError` naming the path, after its flag
    where ``flags`` maps the path to one, and the reason; when no file was replaced yet, the
    message ends with ``unchanged`` (what is on disk then).
    """
    staged: list[tuple[str, Path]] = []
    written: list[Path] = []
    path = None
    try:
        for path, write, mode in writers:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _make_temporary(path.parent, path.name)
            staged.append((tmp, path))
            # mkstemp makes the file private (0600); give it the mode a plain open() would,
            # or the mode of the file it replaces.
            os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
            text = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"}  # file names as bytes
            with os.fdopen(fd, mode, **text) as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
            written.append(path)
    except Exception as err:  # noqa: BLE001
        cause = _os_error_in(err)
        if cause is None or path is None:
            raise
        raise _write_error(path, cause, flags or {}, written, [tmp for tmp, _ in staged], unchanged) from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _write_error(path: Path, cause: OSError, flags: Mapping[Path, str], written: list[Path],
                 temporary: list[str], unchanged: str) -> UserError:
    """``--json out.json: cannot write (No space left on device); nothing was written``."""
    where = f"{flags[path]} {path}" if path in flags else str(path)
    reason = _os_reason(cause)
    if cause.filename is not None and os.fspath(cause.filename) not in (*temporary, str(path)):
        reason += f": {os.fsdecode(cause.filename)}"  # e.g. the folder that could not be made
    if not written:
        return UserError(f"{where}: cannot write ({reason}); {unchanged}")
    names = ", ".join(map(str, written))
    return UserError(f"{where}: cannot write ({reason}); {names} {'was' if len(written) == 1 else 'were'} written")


def _os_error_in(err: BaseException) -> OSError | None:
    """``err`` if it is an ``OSError``, else the one it was raised from (torch.save may wrap
    a failed write), else None. A :class:`UserError` is never one."""
    seen = 0
    while err is not None and not isinstance(err, UserError) and seen < 8:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        seen += 1
    return None


def _os_reason(err: OSError) -> str:
    """``No space left on device``: the system's words for an ``OSError``."""
    return os.strerror(err.errno) if err.errno else _first_line(err)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[object], None], mode: str = "wb",
                     unchanged: str = "nothing was written") -> None:
    """Write one file through a temporary file and ``os.replace``: all of it or nothing."""
    commit_outputs([(path, write, mode)], unchanged=unchanged)


# ------------------------------------------------------------ flags and outputs of scripts


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are user errors like any other: one line
    (``prog: error: --flag VALUE: what is wrong``, no usage), exit status 2 through
    :func:`run_cli`. Its subparsers are of this class too."""

    def error(self, message: str):
        raise UserError(re.sub(r"^argument (\S+): ", r"\1 ", message))


def int_at_least(minimum: int, why: str = "", maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: a whole number of at least ``minimum`` (and at most ``maximum``);
    ``why`` follows the refusal (``--max_samples 3: must be at least 4 (why)``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]}: not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"{text[:40]}: must be {bounds}{f' ({why})' if why else ''}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
# --seed: what every generator seeded from it takes (numpy's legacy one stops at 2**32 - 1)
seed_int = int_at_least(0, "the random generators take seeds below 2**32", maximum=2**32 - 1)


def float_in(low: float, high: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a number in ``[low, high]`` (``(low, high]`` with ``above``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not a number") from None
        if not (value > low if above else value >= low) or not value <= high or math.isnan(value):
            bound = f"above {low:g}" if above else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"{text}: must be {bound}" + (f" and at most {high:g}" if high < math.inf else ""))
        return value

    parse.__name__ = f"float_in_{low:g}_{high:g}"
    return parse



def add_device_flag(parser, default: str = "auto") -> None:
    """``--device``, as every script that computes takes it (auto: the GPU when there is one)."""
    parser.add_argument("--device", default=default,
                        help="auto (the GPU when there is one), cpu, cuda or cuda:N (default: %(default)s)")


def add_output_flags(parser, *, json: str | None = None, csv: str | None = None, fig: str | None = None,
                     fig_help: str = "the figure") -> None:
    """The output flags a script offers: ``--json PATH`` and ``--csv PATH`` (given their
    help texts), ``--fig PATH`` (default ``fig``) with ``--no_fig``."""
    if json:
        parser.add_argument("--json", metavar="PATH", help=json)
    if csv:
        parser.add_argument("--csv", metavar="PATH", help=csv)
    if fig:
        parser.add_argument("--fig", metavar="PATH", default=fig,
                            help=f"{fig_help} (default: %(default)s; its suffix picks the format: "
                            f"{figure_suffixes()})")
        parser.add_argument("--no_fig", action="store_true", help="do not draw the figure")


def figure_suffixes() -> str:
    """``.eps, .jpeg, ..., .svg``: the figure formats matplotlib writes here, every one of
    which ``--fig`` takes (:func:`plotting.figure_format`)."""
    from plotting import figure_formats

    return ", ".join(f".{fmt}" for fmt in figure_formats())


def input_roles(flag: str, paths: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[tuple[str, str]]:
    """``[(path, "FLAG path")]`` for the files given to ``flag`` (one, several or None), as
    :func:`check_distinct_files` and :class:`Outputs` take the inputs of a call."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [(os.fspath(path), f"{flag} {os.fspath(path)}") for path in paths]


class Outputs:
    """The files one command writes: checked before any work is done, written together
    (all of them or none, :func:`commit_outputs`), then listed.

    ``paths`` maps each flag to its path (None: not asked for); the flags in ``figures``
    must name a file ending in an image format. With ``flag``, the keys of ``paths`` are
    plain names and every message names ``flag`` (files in a folder given by one flag).
    """

    def __init__(self, paths: Mapping[str, str | os.PathLike | None], figures: Iterable[str] = ("--fig",),
                 flag: str | None = None, inputs: Iterable[tuple[str | os.PathLike, str]] = (),
                 folders: Iterable[tuple[str | os.PathLike | None, str]] = ()) -> None:
        self.paths = {key: check_writable(path, flag or key) for key, path in paths.items() if path is not None}
        self._flags = {path: flag or key for key, path in self.paths.items()}  # what errors name
        roles = [(path, f"{flag or key} {path}") for key, path in self.paths.items()]
        check_distinct_files(roles, inputs)
        for folder, folder_role in folders:  # data sets' folders the command reads
            check_not_in_folder(roles, folder, folder_role)
        for figure in figures:
            if figure in self.paths and self.image_format(figure) is None:
                raise UserError(f"{figure} {self.paths[figure]}: unknown image format; end the name in one of "
                                f"{figure_suffixes()}")
        self._writers: list[tuple[Path, Callable[[object], None], str]] = []

    @classmethod
    def of(cls, args, *flags: str, inputs: Iterable[tuple[str | os.PathLike, str]] = (),
           folders: Iterable[tuple[str | os.PathLike | None, str]] = ()) -> "Outputs":
        """The outputs that a script's parsed ``args`` ask for among ``flags`` (``--fig``
        unless ``--no_fig``); none may be one of the files ``inputs`` (:func:`input_roles`)
        or a file under one of the data folders ``folders`` (folder, how an error names it)."""
        paths = {flag: getattr(args, flag.lstrip("-")) for flag in flags}
        if "--fig" in paths and getattr(args, "no_fig", False):
            paths["--fig"] = None
        return cls(paths, inputs=inputs, folders=folders)

    def __contains__(self, flag: str) -> bool:
        return flag in self.paths

    def image_format(self, flag: str) -> str | None:
        from plotting import figure_format

        return figure_format(str(self.paths[flag]))

    def add(self, flag: str, content: str | bytes) -> None:
        """Stage ``content`` (text or bytes) for the file of ``flag``."""
        mode = "wb" if isinstance(content, bytes) else "w"
        self._writers.append((self.paths[flag], lambda handle, content=content: handle.write(content), mode))

    def commit(self, announce: Callable[[Path], None] | None = None) -> None:
        """Write every staged file, then ``announce`` each (default: ``wrote PATH`` on stderr)."""
        commit_outputs(self._writers, self._flags)
        for path, _, _ in self._writers:
            (announce or (lambda p: print(f"wrote {p}", file=sys.stderr)))(path)
        self._writers = []

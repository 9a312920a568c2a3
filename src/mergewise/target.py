"""Where an output goes, and how it gets there without ever losing anything.

* **Never an input.** ``--out`` may not be, contain or lie inside an input (checkpoints, the
  recipe, features/calibration files, the stats cache), nor be the current directory or one of
  its parents: ``--overwrite`` would delete them.
* **Never a stranger's directory.** ``--overwrite`` replaces only an empty directory or one
  that looks like a model (config.json, *.safetensors, *.bin, report.json).
* **One writer per target.** A run holds an exclusive ``flock`` on ``.NAME.mergewise-lock`` next
  to the target from its checks to its commit; a second run into the same target fails at once
  in one line. The lock file is removed by its holder (the inode is re-checked after locking,
  so a run that raced with the removal locks again).
* **A swap that never leaves the path empty.** Without ``--overwrite`` the finished temp
  directory becomes the target by one rename that fails if anything appeared there meanwhile
  (Linux ``renameat2(RENAME_NOREPLACE)``), so what another program created is never touched.
  With ``--overwrite`` it is swapped with the old output in one atomic exchange
  (``RENAME_EXCHANGE``), then the old one is deleted. Where the kernel or file system has no
  exchange, two renames with the old output parked as ``.NAME.mergewise-old-PID``: a kill between
  them leaves that recorded state, which the next run into the target repairs (old output back
  in place) before anything else.
* **Leftovers of killed runs are cleaned.** Temp directories are ``.NAME.mergewise-tmp-PID-*``;
  the next run that takes the lock removes those of runs that are gone and says so in one line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .writer import make_ordinary

try:  # POSIX; elsewhere runs are not locked (documented in docs/reliability.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("mergewise")

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
MODEL_MARKERS = ("config.json", "report.json", "*.safetensors", "*.bin", "*.safetensors.index.json")


def tmp_prefix(target: Path) -> str:
    return f".{target.name}.mergewise-tmp-"


def old_name(target: Path, pid: int) -> Path:
    return target.with_name(f".{target.name}.mergewise-old-{pid}")


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.mergewise-lock")


# --- checks -----------------------------------------------------------------------------------

def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_an_input(target: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse a target that is, contains or lies inside an input, or holds the current
    directory; ``inputs`` are (what it is, path) pairs for the message."""
    real = _real(target)
    cwd = _real(Path.cwd())
    if _within(cwd, real):
        raise OutputError(f"{target}: is the current directory or one of its parents; "
                          "choose another --out")
    for what, path in inputs:
        p = _real(path)
        if _within(real, p) or _within(p, real):
            relation = ("is" if real == p else "lies inside" if _within(real, p) else "contains")
            raise OutputError(f"{target}: {relation} {what} {path}; choose another --out "
                              "(an output must never replace an input)")


def looks_like_model(directory: Path) -> bool:
    """Empty, or holding a file a model or a merge output has."""
    try:
        if not any(directory.iterdir()):
            return True
    except OSError:
        return False
    return any(any(directory.glob(pattern)) for pattern in MODEL_MARKERS)


def check_output_target(target: Path, overwrite: bool,
                        inputs: Iterable[tuple[str, Path]] = ()) -> None:
    """Fail early (before reading tensors) when the output cannot or must not be written."""
    check_not_an_input(target, inputs)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputError(f"{target}: output already exists; pass --overwrite (overwrite=True) "
                              "to replace it, or choose another --out")
        if target.is_symlink() or not target.is_dir():
            raise OutputError(f"{target}: exists and is not a directory; refusing to replace it")
        if not looks_like_model(target):
            raise OutputError(f"{target}: is not empty and holds no model files (config.json, "
                              "*.safetensors); refusing to delete it with --overwrite: remove it "
                              "yourself or choose another --out")
    probe = target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{target}: cannot create the output: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: cannot write the output: {probe} is not writable")


# --- the lock ---------------------------------------------------------------------------------

@contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Hold the target's lock for the block (see the module docstring)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{target}: another mergewise (pid {holder}) is writing this "
                                  "output; wait for it to finish or choose another --out") from None
            raise OutputError(f"{target}: cannot lock the output ({exc.strerror})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed that file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


# --- leftovers --------------------------------------------------------------------------------

def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def repair_and_clean(target: Path, keep: Path | None = None) -> None:
    """Under the lock: put back an old output parked by a killed two-rename swap, then remove
    the temp directories of runs that are gone (every one but ``keep``: a live run would hold
    the lock). One log line says what was done."""
    parent = target.parent
    if not parent.is_dir():
        return
    parked = sorted(parent.glob(f".{glob_escape(target.name)}.mergewise-old-*"))
    for old in parked:
        if not target.exists() and not target.is_symlink():
            os.rename(old, target)
            log.warning("%s: restored the previous output, parked by a run killed while "
                        "swapping it (%s)", target, old.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
    stale = [p for p in parent.glob(f"{glob_escape(tmp_prefix(target))}*")
             if p.is_dir() and not p.is_symlink() and p != keep]
    if stale:
        freed = sum(_size(p) for p in stale)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        log.warning("%s: removed %d temp director%s of killed runs (%.1f MB)", target,
                    len(stale), "y" if len(stale) == 1 else "ies", freed / 1e6)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# --- the commit -------------------------------------------------------------------------------

def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False when this system cannot (no renameat2, or the file system does
    not support the flag); raises OSError for any other failure (EEXIST, ...)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Make the finished ``tmp`` the target (see the module docstring)."""
    exists = target.exists() or target.is_symlink()
    if exists and not overwrite:
        raise OutputError(f"{target}: appeared while merging (not created by mergewise); left it "
                          "untouched and discarded this merge: choose another --out")
    if not exists:
        try:
            if _renameat2(tmp, target, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise OutputError(f"{target}: appeared while merging (not created by mergewise); "
                              "left it untouched and discarded this merge") from None
        os.rename(tmp, target)
        return
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = old_name(target, os.getpid())
    os.rename(target, old)  # a kill here leaves `old`: the next run puts it back
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def make_temp(target: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{tmp_prefix(target)}{os.getpid()}-", dir=target.parent))


@contextmanager
def atomic_directory(target: Path, overwrite: bool,
                     inputs: Iterable[tuple[str, Path]] = ()) -> Iterator[Path]:
    """Yield a temp dir next to ``target``, holding the target's lock; on success the temp dir
    becomes the target (``commit``), on any error or signal it is deleted."""
    inputs = list(inputs)
    check_output_target(target, overwrite, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{target}: cannot create the output ({exc.strerror or exc})") from None
    with target_lock(target):
        repair_and_clean(target)
        check_output_target(target, overwrite, inputs)  # again, now that no one else writes
        try:
            tmp = make_temp(target)
            make_ordinary(tmp, 0o777)  # mkdtemp makes it 0700; the output is an ordinary dir
        except OSError as exc:
            raise OutputError(f"{target}: cannot create the output "
                              f"({exc.strerror or exc})") from None
        try:
            yield tmp
            commit(tmp, target, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

"""Safe file primitives: atomic writes and validated safetensors reading.

* Atomic writes: the bytes go to a temporary file in the destination's directory, are
  flushed and fsync'ed, then ``os.replace`` puts them in place, so a crash never leaves a
  half-written adapter.
* Atomic directories (:func:`replaced_dir`): files that must change together (an adapter's
  weights and config) are written into a temporary directory beside the target, which is then
  swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux (two ``os.replace`` elsewhere),
  so a reader sees the whole old or the whole new set, never a mix. A directory that must
  keep its inode (the working directory, a mount point, a read-only parent, another user's)
  gets its files replaced one by one instead, the config last.
* Reading: the safetensors header (JSON with every tensor's dtype, shape and byte range) is
  parsed and validated by ``safetensors.safe_open`` before any tensor is read; any failure
  becomes :class:`AdapterFormatError` naming the file. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as st_save_file

from rankwise.errors import AdapterFormatError


class TensorInfo(NamedTuple):
    """A tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask.

    ``tempfile.mkstemp`` creates its files ``0o600``; an atomically written file gets this mode
    before it is renamed into place, so adapters and results are as readable as any other file.
    """
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read from ``/proc/self/status`` where Linux shows it: reading it with
    ``os.umask`` sets it for a moment, so a file another thread creates then would get 0o666."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: the moment's mask is a strict one
    os.umask(mask)
    return mask


def readable_files(directory: Path) -> None:
    """Give every file under a directory this process just filled the mode ``open()`` gives a
    new file (:func:`default_file_mode`): safetensors' ``save_file``, and so transformers'
    ``save_pretrained``, creates its files ``0o600``. Only for a fresh directory: a hard link
    to someone's file would have its mode changed too."""
    mode = default_file_mode()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


# characters of a destination's name kept in its temporary sibling's name: the whole name
# plus the marks overflowed NAME_MAX (255 bytes) for a valid name of 245 characters
TEMP_STEM_CHARS = 32


def temp_stem(name: str) -> str:
    """The part of ``name`` a temporary file or directory beside it is named with."""
    return name[:TEMP_STEM_CHARS]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + os.replace)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write_with(path, write)


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a new temporary file beside ``path``, which then replaces ``path``
    (fsync, the default file mode, os.replace); on any failure the temporary is removed and
    ``path`` is as it was. An OSError names ``path``, not the temporary."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(path.name)}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, tmp):
            # a full disk names the file meant, not the temporary (nor the rename's pair)
            err.filename, err.filename2 = str(path), None
        raise


@contextlib.contextmanager
def made_parents(path: Path) -> Iterator[None]:
    """Create ``path``'s missing parent directories; when the block raises, remove the ones made
    here that are still empty (deepest first), so a failed write leaves no empty tree behind."""
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in made:
            try:
                directory.rmdir()  # only while empty: anything else put there stays
            except OSError:
                break
        raise


@contextlib.contextmanager
def replaced_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it becomes ``final`` atomically.

    The temporary directory starts with the entries ``final`` already holds (hard links, or
    copies across file systems), so files the caller does not write are kept; write with
    :func:`atomic_write_bytes` (``os.replace`` unlinks the shared name, never writing through
    the link into the old file). On an exception ``final`` is left untouched.

    A symbolic link at ``final`` stays: its target is replaced. Entries another process puts
    into ``final`` while the block runs (e.g. Trainer's per-process ``rng_state_<i>.pth`` in a
    ``checkpoint-<step>`` folder) are moved over from the old directory right after the swap.

    An existing directory that cannot or should not be swapped gets its new files moved in
    one by one with ``os.replace`` (each atomic; JSON files last, so an adapter's config names
    weights that are already in place): one that holds the working directory (``"."``, or
    Trainer's ``output_dir`` run from inside it: the process would be stranded in the old,
    deleted one), a mount point (a container volume: renaming it fails with EBUSY) or one
    holding a mount point (the swap would carry it off and the old tree's removal empty it), and, when
    it is writable itself, one whose parent is not writable and one owned by another user (a
    swap would make it the saver's; a foreign one the saver cannot write is swapped, as before).
    """
    final = Path(final)
    if final.is_symlink():
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final}: expected a directory, found a file")
    if final.is_dir() and _keep_in_place(final):
        with _files_replaced(final) as tmp:
            yield tmp
        return
    tmp = final.parent / f".{temp_stem(final.name)}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # the umask's mode, as mkdir(final) would give; copytree copies final's mode
    try:
        if final.is_dir():
            shutil.copytree(final, tmp, symlinks=True, copy_function=_link, dirs_exist_ok=True)
        yield tmp
        _fsync_dir(tmp)
        swap_in(tmp, final)
        for entry in tmp.iterdir() if tmp.is_dir() else ():  # the old one (if there was one):
            # what another process put there since the links; a rename: an open file keeps
            # working
            if not (final / entry.name).exists() and not (final / entry.name).is_symlink():
                os.replace(entry, final / entry.name)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old directory
        if tmp.exists():  # another user's files there, which this process cannot delete
            warnings.warn(
                f"{final}: saved, but the previous version could not be deleted (files this "
                f"user cannot remove) and is left at {tmp}; remove it as its owner",
                RuntimeWarning,
                stacklevel=3,
            )


def _keep_in_place(directory: Path) -> bool:
    """Whether ``directory`` must keep its inode: its files are replaced one by one
    (:func:`replaced_dir`), not the directory swapped."""
    if _holds_working_dir(directory) or os.path.ismount(directory) or _holds_mount(directory):
        return True
    if not os.access(directory, os.W_OK):  # only a swap can replace it (a sudo-made adapter/)
        return False
    if not os.access(directory.parent, os.W_OK):
        return True
    geteuid = getattr(os, "geteuid", None)  # POSIX only
    return geteuid is not None and directory.stat().st_uid != geteuid()


def _holds_mount(directory: Path) -> bool:
    """Whether a mount point lies anywhere below ``directory`` (a bind mount within one file
    system too): a swap would move it with the old directory, whose removal then empties the
    mounted file system. Linux's mount table where there is one, else the entries' own test."""
    below = str(directory.resolve()).rstrip(os.sep) + os.sep
    points = _mount_points()
    if points is not None:
        return any(point.startswith(below) for point in points)
    try:
        with os.scandir(directory) as entries:
            return any(e.is_dir(follow_symlinks=False) and os.path.ismount(e.path) for e in entries)
    except OSError:
        return False


def _mount_points() -> list[str] | None:
    """Every mount point of this process's namespace (Linux), or None where there is no table."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
            return [_unescape_mount(row[4]) for row in map(str.split, table) if len(row) > 4]
    except OSError:
        return None


def _unescape_mount(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _holds_working_dir(directory: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory is gone
        return False
    target = directory.resolve()
    return cwd == target or target in cwd.parents


@contextlib.contextmanager
def _files_replaced(final: Path) -> Iterator[Path]:
    """A temporary directory inside ``final`` whose files are moved into ``final`` on success."""
    tmp = final / f".rankwise-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        for entry in sorted(tmp.iterdir(), key=lambda p: (p.suffix == ".json", p.name)):
            os.replace(entry, final / entry.name)
        _fsync_dir(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def swap_in(tmp: Path, final: Path, *, stale: Path | None = None) -> None:
    """Put ``tmp`` at ``final``; the old ``final`` (if any) ends up at ``tmp``. Atomic where
    Linux's ``renameat2`` exchange is available; elsewhere the old one passes through ``stale``
    (default: a hidden name beside it) for the moment between two renames."""
    if not final.exists():
        os.replace(tmp, final)
    elif not _exchange(tmp, final):  # no atomic exchange: a brief moment with no ``final``
        if stale is None:
            stale = final.parent / f".{temp_stem(final.name)}.{secrets.token_hex(4)}.stale"
        os.replace(final, stale)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(stale, final)  # the old one back: never neither
            raise
        os.replace(stale, tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unavailable."""
    if sys.platform != "linux":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:  # glibc < 2.28 or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, str]
) -> None:
    """Save ``tensors`` (contiguous CPU copies) to ``path`` atomically with ``metadata``.

    Tensors sharing storage (tied input/output embeddings) are written as separate copies
    under every key, as PEFT's ``save_pretrained`` does (safetensors refuses shared memory).
    """
    plain: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        plain[key] = t

    def write(tmp: str) -> None:
        # written by safetensors straight to the file: save() built the whole file as bytes
        # in memory first (a 611 MB adapter held twice: +1.2 GB at peak, PEFT's save ~0)
        try:
            st_save_file(plain, tmp, metadata=metadata)
        except SafetensorError as err:  # its I/O errors (a full disk) as OSError, as a write's
            found = re.search(r"os error (\d+)", str(err))  # the OS's own errno, when given
            code = int(found.group(1)) if found else errno.EIO
            if not found and "space" in str(err).lower():
                code = errno.ENOSPC
            raise OSError(code, f"{os.strerror(code)} ({err})", str(path)) from None

    atomic_write_with(path, write)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Key -> (dtype, shape) from ``path``'s header, validated without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = TensorInfo(str(sl.get_dtype()), tuple(int(s) for s in sl.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFormatError(f"{path}: not a valid safetensors file ({err})") from None


def read_tensors(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors from ``path`` (CPU); failures become AdapterFormatError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFormatError(f"{path}: cannot read tensors ({err})") from None

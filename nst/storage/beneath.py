"""Local files reached beneath allowed roots without following a symlink: checked as opened, opened once.

A path is resolved (`os.path.realpath`) and judged against the roots; its resolved form is then walked from `/` one
component at a time with `O_NOFOLLOW`, so a component swapped for a symlink since the check (pointing anywhere) is
refused, never followed. The file judged is the file opened; size and mtime come from the open file (`fstat`).
`opened` hands that open file to a caller that streams it (a weights file hashed in chunks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat as _stat
from collections.abc import Iterator, Sequence
from io import BufferedReader

from nst.errors import StorageError
from nst.storage.base import TMP_SUFFIX, ObjectInfo, local_path, too_big

# Directories are walked as O_PATH descriptors where the OS has them (Linux): looked through, never read.
_DIR = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in opens at once (and is then refused as not a regular file) instead of hanging.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NOT_A_LINK = "the run's own folders are real folders inside the output, never symlinks"
SWAPPED = "not opened: a part of its path is a symlink (never followed) or a file where a folder should be"


def under(real: str, roots: Sequence[str]) -> bool:
    """Whether the resolved local path `real` lies under one of `roots` (resolved, each ending with a separator)."""
    return any("://" not in r and (real + os.sep).startswith(r) for r in roots)


def _error(exc: OSError, uri: str, action: str, swapped: str = SWAPPED) -> StorageError:
    if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):  # a part of the path is (now) a symlink or a file
        return StorageError(f"{uri}: {swapped}")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri}: not found: no such file or directory")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: cannot {action}: permission denied")
    return StorageError(f"{uri}: cannot {action}: {exc.strerror or type(exc).__name__}")


@contextlib.contextmanager
def _folder(real_dir: str, *, create: Sequence[str] = ()) -> Iterator[int]:
    """A descriptor of the resolved folder `real_dir`, walked from `/` without following any symlink; the folders
    named in `create` (below it, in order) are made if missing and walked the same way."""
    fd = os.open("/", _DIR)
    try:
        parts = [p for p in real_dir.split(os.sep) if p]
        for i, part in enumerate([*parts, *create]):
            if i >= len(parts):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _opened(uri: str, real_dir: str, name: str) -> Iterator[BufferedReader]:
    """The regular file `name` in the resolved `real_dir`, open for reading, no component followed if a symlink."""
    try:
        with _folder(real_dir) as dfd:
            fd = os.open(name, _FILE, dir_fd=dfd)
    except OSError as exc:
        raise _error(exc, uri, "read") from None
    if not _stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder in its own words
        os.close(fd)
        raise StorageError(f"{uri}: cannot read: not a regular file")
    with os.fdopen(fd, "rb") as fh:
        yield fh


def _whole(uri: str, fh: BufferedReader, max_bytes: int | None) -> tuple[bytes, ObjectInfo]:
    """All of an open file (at most `max_bytes`) and its info; a file that changes while it is read is an error."""
    try:
        st = os.fstat(fh.fileno())
        if max_bytes is not None and st.st_size > max_bytes:
            raise too_big(uri, st.st_size, max_bytes)
        data = fh.read(st.st_size + 1)  # +1: a file that grew since the fstat is seen
        after = os.fstat(fh.fileno())
    except OSError as exc:
        raise _error(exc, uri, "read") from None
    if len(data) != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise StorageError(f"{uri}: cannot read: it changed while it was read (run again once it is complete)")
    return data, ObjectInfo(uri=uri, size=st.st_size, mtime_ns=st.st_mtime_ns)


def resolved(uri: str, roots: Sequence[str], what: str) -> str:
    """The resolved path of a local URI that lies under `roots`; a StorageError (nothing opened) otherwise."""
    real = os.path.realpath(os.path.abspath(os.path.expanduser(local_path(uri))))
    if not under(real, roots):
        raise StorageError(f"{uri}: not opened: outside the allowed {what} roots (symlinks resolved)")
    return real


def stat(uri: str, roots: Sequence[str]) -> ObjectInfo:
    """Size and mtime of a regular file under the input `roots`, the last component not followed either."""
    real = resolved(uri, roots, "input")
    try:
        with _folder(os.path.dirname(real)) as dfd:
            st = os.stat(os.path.basename(real), dir_fd=dfd, follow_symlinks=False)
    except OSError as exc:
        raise _error(exc, uri, "stat") from None
    if _stat.S_ISLNK(st.st_mode):
        raise StorageError(f"{uri}: {SWAPPED}")
    if not _stat.S_ISREG(st.st_mode):
        raise StorageError(f"{uri}: cannot stat: not a regular file")
    return ObjectInfo(uri=uri, size=st.st_size, mtime_ns=st.st_mtime_ns)


def opened(uri: str, roots: Sequence[str]) -> contextlib.AbstractContextManager[BufferedReader]:
    """A regular file under the input `roots`, open for reading (streamed: e.g. a weights file hashed in chunks)."""
    real = resolved(uri, roots, "input")
    return _opened(uri, os.path.dirname(real), os.path.basename(real))


def read(uri: str, roots: Sequence[str], max_bytes: int | None) -> tuple[bytes, ObjectInfo]:
    """The content of a regular file under the input `roots` and the info of that open file (at most `max_bytes`)."""
    with opened(uri, roots) as fh:
        return _whole(uri, fh, max_bytes)


def write_in(uri: str, data: bytes) -> ObjectInfo:
    """Write the local `<top>/<folder>/<name>` atomically (temp file + rename), `<folder>` made if missing and refused
    if it is a symlink or not a folder; `<top>` is judged by where it points. The info is the written file's."""
    path = os.path.abspath(local_path(uri))
    top, folder = os.path.split(os.path.dirname(path))
    name = os.path.basename(path)
    try:
        os.makedirs(top, exist_ok=True)
        with _folder(os.path.realpath(top), create=[folder]) as dfd:
            try:
                mode: int | None = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode & 0o7777
            except FileNotFoundError:
                mode = None
            tmp = f".{name}.{secrets.token_hex(8)}{TMP_SUFFIX}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    if mode is not None:
                        os.fchmod(fh.fileno(), mode)
                    os.fsync(fh.fileno())
                    st = os.fstat(fh.fileno())
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
    except OSError as exc:
        raise _error(exc, uri, "write", f"not written: {folder} is a symlink or not a folder ({NOT_A_LINK})") from None
    return ObjectInfo(uri=uri, size=st.st_size, mtime_ns=st.st_mtime_ns)

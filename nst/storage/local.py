"""`LocalStore`: plain paths and `file://` URIs on a local (POSIX) filesystem.

Every write goes to a temp file in the target's directory first (fsync'd), then takes the name in one step:
`os.replace` (write, replace_if) or `os.link` (create_new: fails if the name exists). A reader never sees an empty
or partial file, and a crash leaves at most a `.<name>.<random>.nst-tmp` file, which listings skip and
`remove_stale_temp` deletes. The checks of `replace_if` and `delete(expected=)` and every change of a name (but
`create_new`'s link, atomic in itself) are made holding an exclusive `flock` on the name's directory, so a
conditional operation is atomic against every other process and thread using this store (S3's If-Match).
A version is identified by (size, st_mtime_ns); the temp file's mtime is stamped from the nanosecond clock, so two
versions written by this store differ even within one kernel clock tick.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat as _stat
import threading
import time
from collections.abc import Callable, Iterator

from nst.errors import StorageError
from nst.storage.base import (
    TMP_SUFFIX,
    ObjectInfo,
    can_descend,
    file_uri,
    local_path,
    match,
    scheme,
    split_pattern,
    too_big,
)


def _os_error(exc: OSError, uri: str, action: str) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri}: not found: no such file or directory")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri}: cannot {action}: is a directory")
    if isinstance(exc, NotADirectoryError | FileExistsError):
        return StorageError(f"{uri}: cannot {action}: a parent of it is a file, not a directory")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: cannot {action}: permission denied")
    return StorageError(f"{uri}: cannot {action}: {exc.strerror or exc}")


_umask_lock = threading.Lock()
_umask_cache: list[int] = []


def _umask() -> int:
    """The process umask, read once (from /proc where possible: os.umask can only be read by setting it)."""
    if not _umask_cache:
        with _umask_lock:
            if not _umask_cache:
                current = None
                with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
                    for line in fh:
                        if line.startswith("Umask:"):
                            current = int(line.split()[1], 8)
                if current is None:
                    current = os.umask(0o022)
                    os.umask(current)
                _umask_cache.append(current)
    return _umask_cache[0]


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _temp_name(path: str) -> str:
    """A fresh temp name beside `path` (the same directory, so a rename or link into place stays on one fs)."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.{secrets.token_hex(8)}{TMP_SUFFIX}")


def _info(uri: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(uri=uri, size=st.st_size, etag=None, mtime_ns=st.st_mtime_ns)


def _is_version(st: os.stat_result, expected: ObjectInfo) -> bool:
    if expected.mtime_ns is None:
        raise StorageError(f"{expected.uri}: expected version has no modification time (not a local file's info)")
    return st.st_size == expected.size and st.st_mtime_ns == expected.mtime_ns


def _walk_files(root: str, descend: Callable[[list[str]], bool] | None = None) -> Iterator[tuple[list[str], str]]:
    """(relative path segments, path) of every file name under `root`, sorted; our temp files skipped."""

    def onerror(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        rel = os.path.relpath(dirpath, root)
        rel_segs = [] if rel == os.curdir else rel.split(os.sep)
        if descend is not None:
            dirnames[:] = [d for d in dirnames if descend([*rel_segs, d])]
        dirnames.sort()
        for name in sorted(filenames):
            if not _is_temp(name):
                yield [*rel_segs, name], os.path.join(dirpath, name)


def _regular_stat(path: str) -> os.stat_result | None:
    """stat of a regular file; None if it vanished or is something else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st if _stat.S_ISREG(st.st_mode) else None


@contextlib.contextmanager
def _dir_locked(path: str) -> Iterator[None]:
    """An exclusive `flock` on the directory holding `path` (released on exit, or by the kernel if the process dies).

    Each entry opens the directory anew, so threads of one process exclude each other as processes do.
    """
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class LocalStore:
    """Local files behind the `Store` protocol (atomic writes, conditional create/replace/delete)."""

    def read(self, uri: str, max_bytes: int | None) -> tuple[bytes, ObjectInfo]:
        """Content and (size, mtime) of the same open file."""
        try:
            with open(local_path(uri), "rb") as fh:
                st = os.fstat(fh.fileno())
                if max_bytes is not None and st.st_size > max_bytes:
                    raise too_big(uri, st.st_size, max_bytes)
                # read(n) allocates n bytes up front: ask for what the file holds (+1 to see it grow past the limit).
                data = fh.read() if max_bytes is None else fh.read(min(st.st_size, max_bytes) + 1)
                if max_bytes is not None and st.st_size < len(data) <= max_bytes:  # written to since: read on
                    data += fh.read(max_bytes + 1 - len(data))
        except OSError as exc:
            raise _os_error(exc, uri, "read") from None
        return data, _info(uri, st)

    def _temp_file(self, path: str, data: bytes, mode: int | None) -> tuple[str, os.stat_result]:
        """A complete, fsync'd temp file beside `path` holding `data` (mode: `path`'s, else 0o666 less the umask)."""
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = _temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                now = time.time_ns()  # not the kernel's coarse tick: versions written within one tick differ
                os.utime(fh.fileno(), ns=(now, now))
                os.fsync(fh.fileno())
                st = os.fstat(fh.fileno())  # a rename or link keeps size and mtime
            os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp, st

    @contextlib.contextmanager
    def _staged(self, path: str, data: bytes, mode: int | None) -> Iterator[tuple[str, os.stat_result]]:
        """`_temp_file` for the block's length: removed on exit unless the block renamed it away."""
        tmp, st = self._temp_file(path, data, mode)
        try:
            yield tmp, st
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def write(self, uri: str, data: bytes, content_type: str | None) -> ObjectInfo:
        """Temp file + `os.replace` (parents created; an existing file's mode kept)."""
        path = local_path(uri)
        try:
            try:
                mode: int | None = os.stat(path).st_mode & 0o7777
            except OSError:
                mode = None
            with self._staged(path, data, mode) as (tmp, st), _dir_locked(path):
                os.replace(tmp, path)
        except OSError as exc:
            raise _os_error(exc, uri, "write") from None
        return _info(uri, st)

    def create_new(self, uri: str, data: bytes, content_type: str) -> ObjectInfo | None:
        """Temp file + `os.link` to the name: only one creator wins, and the file appears complete or not at all."""
        path = local_path(uri)
        try:
            with self._staged(path, data, None) as (tmp, st):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return None
        except OSError as exc:
            raise _os_error(exc, uri, "create") from None
        return _info(uri, st)

    def replace_if(self, uri: str, data: bytes, expected: ObjectInfo, content_type: str) -> ObjectInfo | None:
        """Temp file; then, holding the directory's lock, check the version, `os.replace` (no empty name)."""
        path = local_path(uri)
        try:
            st = _regular_stat(path)
            if st is None or not _is_version(st, expected):
                return None
            with self._staged(path, data, st.st_mode & 0o7777) as (tmp, new), _dir_locked(path):
                st = _regular_stat(path)
                if st is None or not _is_version(st, expected):
                    return None
                os.replace(tmp, path)
                return _info(uri, new)
        except OSError as exc:
            raise _os_error(exc, uri, "replace") from None

    def delete(self, uri: str, expected: ObjectInfo | None) -> bool:
        """Unlink (a missing file is not an error); with `expected`, only that version (checked holding the lock)."""
        path = local_path(uri)
        try:
            with _dir_locked(path):
                st = _regular_stat(path) if expected is not None else None
                if expected is not None and (st is None or not _is_version(st, expected)):
                    return False
                os.unlink(path)
            return True
        except FileNotFoundError:  # the file, or its directory
            return expected is None
        except OSError as exc:
            raise _os_error(exc, uri, "delete") from None

    def stat(self, uri: str) -> ObjectInfo:
        """Size and mtime of a regular file."""
        path = local_path(uri)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _os_error(exc, uri, "stat") from None
        if not _stat.S_ISREG(st.st_mode):
            raise StorageError(f"{uri}: cannot stat: not a regular file")
        return _info(uri, st)

    def _files(
        self,
        uri: str,
        root: str,
        shown_as: Callable[[list[str]], str],
        wild: list[str] | None = None,
    ) -> list[ObjectInfo]:
        """Infos of the regular files under `root` (matching the pattern segments `wild`, if given)."""
        descend = None if wild is None else (lambda segs: can_descend(wild, segs))
        out = []
        try:
            for segs, path in _walk_files(root, descend):
                if wild is not None and not match(wild, segs):
                    continue
                st = _regular_stat(path)
                if st is not None:
                    out.append(_info(shown_as(segs), st))
        except OSError as exc:
            raise _os_error(exc, uri, "list") from None
        return sorted(out, key=lambda i: i.uri)

    def list_prefix(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every regular file under the directory, recursively."""
        root = local_path(prefix_uri)
        if not os.path.isdir(root):
            return []
        as_uri = scheme(prefix_uri) == "file"

        def shown_as(segs: list[str]) -> str:
            path = os.path.join(root, *segs)
            return file_uri(path) if as_uri else path

        return self._files(prefix_uri, root, shown_as)

    def glob(self, pattern_uri: str) -> list[ObjectInfo]:
        """Walk from the pattern's literal head, descending only where a match is possible."""
        literal, wild = split_pattern(local_path(pattern_uri).replace(os.sep, "/"))
        head = "/".join(literal)  # "" for a relative pattern starting with a wildcard or for the root "/"
        root = (head or "/") if literal else os.curdir
        if not os.path.isdir(root):
            return []
        as_uri = scheme(pattern_uri) == "file"

        def shown_as(segs: list[str]) -> str:
            path = (head + "/" if literal else "") + "/".join(segs)
            return file_uri(path) if as_uri else path

        return self._files(pattern_uri, root, shown_as, wild)

    def presigned_url(self, uri: str, expires_s: int) -> str:
        """Local files need no signature: the `file://` URI."""
        return file_uri(local_path(uri))

    def join(self, base_dir_uri: str, relative: str) -> str:
        """`os.path.join` + normpath, keeping a `file://` base a URI and a trailing slash."""
        keep_slash = relative == "" or relative.endswith("/")
        path = os.path.normpath(os.path.join(local_path(base_dir_uri), relative))
        if scheme(base_dir_uri) == "file":
            return file_uri(path, trailing_slash=keep_slash)
        return path + os.sep if keep_slash and not path.endswith(os.sep) else path

    def parent(self, uri: str) -> str:
        """The containing directory ("." for a bare name)."""
        path = local_path(uri)
        stripped = path.rstrip(os.sep) or os.sep
        directory = os.path.dirname(stripped) or "."
        return file_uri(directory) if scheme(uri) == "file" else directory

    def remove_stale_temp(self, prefix_uri: str, older_than_s: float) -> int:
        """Delete `.*.nst-tmp` files under the directory whose last change (ctime: a rename counts) is old enough."""
        root = local_path(prefix_uri)
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            for dirpath, _dirs, names in os.walk(root):
                for name in names:
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        st = os.lstat(path)
                        if _is_temp(name) and _stat.S_ISREG(st.st_mode) and max(st.st_mtime, st.st_ctime) < cutoff:
                            os.unlink(path)
                            removed += 1
        except OSError as exc:
            raise _os_error(exc, prefix_uri, "clean up") from None
        return removed

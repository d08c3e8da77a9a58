"""Write a whole output folder or nothing.

Work happens in a clearly named temporary folder beside DST (`.NAME.tmp-moe_adapters-HOST-PID-XXXXXX`), which is
renamed to DST only when every file is complete and flushed to disk (fsync), so neither a killed process nor a
power cut can leave a DST that looks complete but is not. A lock beside DST makes a second conversion into the same
DST fail at once instead of racing. A process killed mid-way leaves no DST, only a temporary folder that the next
run into that DST removes (it knows the folder is stale: same host, process gone).

`--overwrite` moves the old DST aside (`.NAME.old-moe_adapters-...`), renames the new one in and then deletes the
old one. A kill between the two renames leaves no DST but the old one intact beside it; the next run puts it back
before doing anything else. An old DST that cannot be fully deleted (a read-only subfolder) is renamed to
`.NAME.trash-moe_adapters-...`, which nothing ever puts back.

A DST that is empty, or that holds the current directory (`.`, `..`), is refused: replacing it would pull the
working directory out from under the user.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import secrets
import shutil
import socket

from .errors import DestinationError, MoeAdaptersError

TMP_MARK = ".tmp-moe_adapters-"
OLD_MARK = ".old-moe_adapters-"
TRASH_MARK = ".trash-moe_adapters-"
_WRITE_ERRORS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _is_within(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return os.path.commonpath([child, parent]) == parent


def _owner(path: str, mark: str) -> tuple[str, int] | None:
    """(host, pid) from a name `...{mark}HOST-PID-HEX`; None when it is not one of ours."""
    try:
        host, pid, _ = path.rsplit(mark, 1)[1].rsplit("-", 2)
        return host, int(pid)
    except ValueError:
        return None


def _stale(path: str, mark: str) -> bool:
    """Left by a dead process of this host. A folder of another host (a shared filesystem) is never touched."""
    owner = _owner(path, mark)
    return owner is not None and owner[0] == _HOST and not _pid_alive(owner[1])


def _discard(path: str) -> None:
    """Delete a file, link or folder; what cannot be deleted is renamed so that no run ever restores it."""
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path) and OLD_MARK in os.path.basename(path):
        try:
            os.rename(path, path.replace(OLD_MARK, TRASH_MARK))
        except OSError:
            pass


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file and folder under `root`: a rename is durable before the data it names unless we wait."""
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            _fsync_path(os.path.join(dirpath, fn))
        _fsync_path(dirpath, directory=True)


class AtomicFolder:
    """`with AtomicFolder(dst) as out:` write into `out.tmp`, call `out.commit()`; anything else leaves no DST."""

    def __init__(
        self, dst: str, *, overwrite: bool = False, sources: tuple[str, ...] = (), tmp: str | None = None
    ) -> None:
        if not str(dst).strip():
            raise DestinationError("empty destination path", file=repr(str(dst)))
        self.dst = os.path.abspath(dst)
        self.overwrite = overwrite
        self.sources = sources
        parent, name = os.path.split(self.dst)
        self.parent, self.name = parent, name
        tag = f"{_HOST}-{os.getpid()}-{secrets.token_hex(3)}"
        # `tmp` is given when several processes share one temporary folder (a distributed conversion, distributed.py)
        self.tmp = tmp or os.path.join(parent, f".{name}{TMP_MARK}{tag}")
        self._backup = os.path.join(parent, f".{name}{OLD_MARK}{tag}")
        self._lock_fd: int | None = None
        self._lock_path = os.path.join(parent, f".{name}.moe_adapters.lock")

    def __enter__(self) -> "AtomicFolder":
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = None
        if cwd is not None and _is_within(cwd, self.dst):
            raise DestinationError("destination holds the current directory; choose another folder", file=self.dst)
        for src in self.sources:
            if _is_within(self.dst, src) or _is_within(src, self.dst):
                raise DestinationError("destination overlaps the source; choose a folder outside it", file=self.dst)
        try:
            os.makedirs(self.parent, exist_ok=True)
        except OSError as e:
            raise DestinationError(f"cannot create: {e.strerror}", file=self.parent) from None
        self._lock()
        try:
            self._recover()
            self._clean_stale()
            if os.path.lexists(self.dst) and not self.overwrite:
                raise DestinationError("already exists (pass --overwrite to replace it)", file=self.dst)
            try:
                os.mkdir(self.tmp)
            except FileExistsError:
                raise DestinationError(
                    "temporary folder already exists (left by an interrupted run with the same id?): remove it",
                    file=self.tmp,
                ) from None
            except OSError as e:
                raise DestinationError(f"cannot create a temporary folder: {e.strerror}", file=self.tmp) from None
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self) -> None:
        """flock a lock file beside DST, making sure the file we locked is still the one at that path (a process
        finishing may unlink it between our open and our flock; locking the unlinked file would protect nothing)."""
        while True:
            try:
                fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise DestinationError(f"cannot create the lock file: {e.strerror}", file=self._lock_path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DestinationError("another conversion is writing this destination now", file=self.dst) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise DestinationError(f"cannot lock: {e.strerror}", file=self._lock_path) from None
                # A filesystem without locks: go on unlocked; the final rename still lets only one run win.
            try:
                same = os.stat(self._lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)  # while still holding it: a waiter then sees a new inode and retries
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self) -> None:
        """Put back an old DST that an interrupted `--overwrite` moved aside (only when DST itself is missing)."""
        for old in sorted(glob.glob(os.path.join(self.parent, f".{glob.escape(self.name)}{OLD_MARK}*"))):
            if not _stale(old, OLD_MARK):
                continue
            if not os.path.lexists(self.dst):
                os.rename(old, self.dst)
            else:  # the new DST was renamed in; the old one was on its way out
                _discard(old)

    def _clean_stale(self) -> None:
        """Remove temporary folders of earlier runs into this DST whose process is gone."""
        for old in glob.glob(os.path.join(self.parent, f".{glob.escape(self.name)}{TMP_MARK}*")):
            if _stale(old, TMP_MARK):
                shutil.rmtree(old, ignore_errors=True)

    def commit(self) -> None:
        """Flush the finished folder, then make it DST in one rename (two with --overwrite, see the module doc)."""
        try:
            fsync_tree(self.tmp)
        except OSError as e:
            raise DestinationError(f"cannot flush to disk: {e.strerror}", file=self.tmp) from None
        backup = None
        if os.path.lexists(self.dst):
            if not self.overwrite:
                raise DestinationError("appeared while converting (another process?)", file=self.dst)
            backup = self._backup
            os.rename(self.dst, backup)
        try:
            os.rename(self.tmp, self.dst)
        except OSError as e:
            if backup:
                os.rename(backup, self.dst)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise DestinationError("appeared while converting (another process?)", file=self.dst) from None
            raise DestinationError(f"cannot rename into place: {e.strerror}", file=self.dst) from None
        try:
            _fsync_path(self.parent, directory=True)
        except OSError:
            pass  # the rename happened; only its durability across a power cut is in question
        if backup:
            _discard(backup)

    def __exit__(self, exc_type, exc, tb) -> None:
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()
        if isinstance(exc, OSError) and not isinstance(exc, MoeAdaptersError):
            # e.g. EFBIG/ENOSPC from a write the engine did not wrap: still one error line that names a file
            what = "cannot write" if exc.errno in _WRITE_ERRORS else "I/O error"
            raise DestinationError(f"{what}: {exc.strerror or exc}", file=exc.filename or self.dst) from None

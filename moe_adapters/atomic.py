"""Write a whole output folder or nothing.

Work happens in a clearly named temporary folder beside DST (`.NAME.tmp-moe_adapters-PID-XXXX`), which is renamed
to DST only when every file is complete. A lock beside DST makes a second conversion into the same DST fail at once
instead of racing. A process killed mid-way leaves no DST, only a temporary folder that the next run removes.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import secrets
import shutil

from .errors import DestinationError

TMP_MARK = ".tmp-moe_adapters-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_within(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return os.path.commonpath([child, parent]) == parent


class AtomicFolder:
    def __init__(self, dst: str, *, overwrite: bool = False, sources: tuple[str, ...] = ()) -> None:
        self.dst = os.path.abspath(dst)
        self.overwrite = overwrite
        self.sources = sources
        parent, name = os.path.split(self.dst)
        self.parent, self.name = parent, name
        self.tmp = os.path.join(parent, f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}")
        self._lock_fd: int | None = None
        self._lock_path = os.path.join(parent, f".{name}.moe_adapters.lock")

    def __enter__(self) -> "AtomicFolder":
        for src in self.sources:
            if _is_within(self.dst, src) or _is_within(src, self.dst):
                raise DestinationError("destination overlaps the source; choose a folder outside it", file=self.dst)
        if os.path.lexists(self.dst) and not self.overwrite:
            raise DestinationError("already exists (pass --overwrite to replace it)", file=self.dst)
        try:
            os.makedirs(self.parent, exist_ok=True)
            self._lock_fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DestinationError("another conversion is writing this destination now", file=self.dst) from None
        except OSError as e:
            raise DestinationError(f"cannot create: {e.strerror}", file=self.dst) from None
        self._clean_stale()
        try:
            os.mkdir(self.tmp)
        except OSError as e:
            raise DestinationError(f"cannot create a temporary folder: {e.strerror}", file=self.tmp) from None
        return self

    def _clean_stale(self) -> None:
        """Remove temporary folders of earlier runs into this DST whose process is gone."""
        for old in glob.glob(os.path.join(self.parent, f".{glob.escape(self.name)}{TMP_MARK}*")):
            try:
                pid = int(old.rsplit(TMP_MARK, 1)[1].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(old, ignore_errors=True)

    def commit(self) -> None:
        backup = None
        if os.path.lexists(self.dst):
            if not self.overwrite:
                raise DestinationError("appeared while converting (another process?)", file=self.dst)
            backup = os.path.join(self.parent, f".{self.name}.old-moe_adapters-{os.getpid()}-{secrets.token_hex(3)}")
            os.rename(self.dst, backup)
        try:
            os.rename(self.tmp, self.dst)
        except OSError as e:
            if backup:
                os.rename(backup, self.dst)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise DestinationError("appeared while converting (another process?)", file=self.dst) from None
            raise DestinationError(f"cannot rename into place: {e.strerror}", file=self.dst) from None
        if backup:
            shutil.rmtree(backup, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)

"""Safe file writes: every file the project writes is replaced atomically or appended durably.

``os.replace`` is atomic only within one filesystem (across filesystems ``os.replace`` fails and
``shutil.move`` silently becomes a copy that a crash can leave half-written), so the temporary file
is always created in the destination folder, flushed and fsync'ed, renamed over the target, and the
folder is fsync'ed so the rename itself survives a power loss. A failed write removes its temporary
file and leaves the previous file untouched.

Temporary names are ``.<target name>.tmp-<host>-<pid>-<random>``: hidden, never ending in the
target's extension (so ``last.ckpt`` lookups never see them), and tagged with their writer so a
later write can remove the leftovers of a writer that was killed (:func:`remove_stale_temps`).

Plain Python (no torch): usable from every layer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import IO, Iterator, Union

from .errors import ConfigError

__all__ = [
    "append_line",
    "read_utf8",
    "atomic_write",
    "default_mode",
    "fsync_dir",
    "is_temp_file",
    "publish_folder",
    "remove_stale_temps",
    "temp_path",
]

PathLike = Union[str, os.PathLike]

_TEMP_TAG = ".tmp-"


def _umask() -> int:
    # The umask can only be read by setting it; set it straight back (a process-wide value: a file
    # created by another thread in between would get mode 0o022 at worst).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def fsync_dir(path: PathLike) -> None:
    """Make a rename or new entry in folder ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def temp_path(target: PathLike) -> Path:
    """A fresh temporary path next to ``target`` (same folder, hence same filesystem)."""
    target = Path(target)
    host = socket.gethostname().replace("-", "_") or "host"
    return target.with_name(f".{target.name}{_TEMP_TAG}{host}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_file(path: PathLike, target_name: str | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` (for ``target_name``, if given)."""
    name = Path(path).name
    if not name.startswith(".") or _TEMP_TAG not in name:
        return False
    return target_name is None or name.startswith(f".{target_name}{_TEMP_TAG}")


def _writer_is_dead(path: Path) -> bool:
    """True when the temp file's writer ran on this host and that process no longer exists."""
    try:
        host, pid, _ = path.name.rsplit(_TEMP_TAG, 1)[1].rsplit("-", 2)
        pid_number = int(pid)
    except ValueError:
        return False
    if host != (socket.gethostname().replace("-", "_") or "host"):
        return False  # another machine's writer (shared filesystem): it may still be writing
    if pid_number == os.getpid():
        return False
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


def remove_stale_temps(folder: PathLike, target_name: str | None = None) -> list[Path]:
    """Remove temporary files left in ``folder`` by writers that were killed (same host, dead pid).

    Temporary files of live writers, or of other hosts, are left alone; every lookup in this project
    ignores them anyway. Returns the removed paths.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        if is_temp_file(path, target_name) and _writer_is_dead(path):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_write(target: PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 follow_symlinks: bool = True) -> Iterator[IO]:
    """Write ``target`` all at once: yields a file object; on normal exit the content replaces
    ``target`` atomically, on an exception ``target`` is left as it was and the temp file is removed.

    The new file keeps the mode of the file it replaces, or gets the umask's default mode (not the
    0600 of ``mkstemp``). ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). A symlinked target is
    written through the link (``follow_symlinks``) or replaced by a file; a target that exists and is
    not a regular file (``/dev/stdout``, a FIFO) cannot be replaced and is written directly.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    target = Path(target)
    if follow_symlinks and target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_file() and not target.is_symlink():
        with open(target, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
        return
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder, target.name)
    tmp = temp_path(target)
    try:
        new_mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        new_mode = default_mode()
    # O_EXCL: never follow or reuse an existing path.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        handle = os.fdopen(fd, mode, encoding=None if "b" in mode else encoding)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, new_mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(folder)


def append_line(handle: IO[str], line: str) -> None:
    """Append one line to an open text file and make it durable (flush + fsync): a crash loses at
    most the line being written, never earlier ones."""
    handle.write(line if line.endswith("\n") else line + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def publish_folder(folder: PathLike) -> None:
    """Give a folder built in a private temp dir (``mkdtemp``: mode 0700) the umask's modes, and
    fsync its files and folders so a later rename publishes complete content."""
    folder = Path(folder)
    dir_mode, file_mode = default_mode(directory=True), default_mode()
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            os.chmod(path, file_mode)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for name in dirs:
            os.chmod(Path(root) / name, dir_mode)
        fsync_dir(root)
    os.chmod(folder, dir_mode)


def read_utf8(path: PathLike, where: str) -> str:
    """The text of ``path``; bytes that are not UTF-8 are a one-line
    :class:`~diffusion_lm.errors.ConfigError` naming ``where``, the line and the byte offset."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{where} line {line}: not valid UTF-8 (byte offset {err.start}); "
                          "save the file as UTF-8") from None

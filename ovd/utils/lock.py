"""One run per output folder: a lock file naming the run that holds it.

``<folder>/.ovd.lock`` is created exclusively (``O_CREAT | O_EXCL``) and holds the pid, host, process
start time and command of its run. A second run finds it and fails at once with an error naming that
run. A lock whose run is gone (same host, and no live process with that pid and start time: the run was
killed) is stale: it is taken over with a warning. A lock of another host cannot be checked; the error
says to delete the file if that run is known to be over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ovd.errors import OVDError

logger = logging.getLogger(__name__)

LOCK_FILE = ".ovd.lock"
F = TypeVar("F", bound=Callable[..., Any])


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the command name


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _process_start(pid)
    return start is None or now is None or now == start  # another process reusing the pid is not the run


def create_pid_lock(path: Path) -> int:
    """Create ``path`` exclusively holding ``"<pid> <host>"`` and return its open descriptor; a lock of
    that form left by a process of this host that is gone (killed) is replaced, with a warning.

    Raises:
        FileExistsError: a live (or unknown) process holds it.
    """
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid, host = path.read_text().split()[:2]
                stale = host == socket.gethostname() and not _alive(int(pid), None)
            except (OSError, ValueError):
                stale = False  # vanished, being written, or another format: not known to be stale
            if attempt or not stale:
                raise
            logger.warning("%s: removing the lock of process %s, which is gone", path, pid)
            path.unlink(missing_ok=True)
            continue
        os.write(fd, f"{os.getpid()} {socket.gethostname()}".encode())
        return fd
    raise FileExistsError(path)


def _describe(info: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("time", 0))))
    return f"pid {info.get('pid')} on {info.get('host')}, started {started}: {info.get('command', '?')}"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # vanished, or being written by its run this instant
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if needed) for the duration of the block.

    Raises:
        OVDError: another live run holds it (naming that run), or a run on another host does.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _process_start(os.getpid()),
        "time": time.time(),
        "command": " ".join(sys.argv)[:300],
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read(path)
            if other is None:
                time.sleep(0.05)  # its writer has not finished writing it
                other = _read(path)
            if (
                other is None
                or not isinstance(other.get("pid"), int)
                or (other.get("host") == me["host"] and not _alive(other["pid"], other.get("start")))
            ):
                logger.warning("%s: taking over a stale lock (%s)", path, _describe(other or {}))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            where = "" if other.get("host") == me["host"] else " (another host: delete the file if that run is over)"
            raise OVDError(f"another run is writing into this folder: {_describe(other)}{where}", path=path) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise OVDError("could not take the lock (other runs keep taking it)", path=path)
    try:
        yield path
    finally:
        if (_read(path) or {}).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def holds_output_lock(func: F) -> F:
    """Decorate ``func(first, output_dir, ...)`` to hold ``output_dir``'s lock while it runs (in the
    main process of a job only: ``RANK`` 0 or unset)."""

    @functools.wraps(func)
    def wrapper(first: Any, output_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        if int(os.environ.get("RANK", "0")) != 0:
            return func(first, output_dir, *args, **kwargs)
        with output_lock(output_dir):
            return func(first, output_dir, *args, **kwargs)

    return wrapper  # type: ignore[return-value]

"""Atomic file writes and JSON reading with clear errors.

A file is written to a temporary sibling and moved into place with :func:`os.replace`, so a run that
is killed mid-write never leaves a truncated file where a good one used to be. The file is
``fsync``-ed before the rename and its folder after it, so that a power loss cannot leave an empty
"finished" file either; it gets the permissions a plain ``open`` would give (``0o666`` less the
umask), not :func:`tempfile.mkstemp`'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ovd.errors import OVDError


class DiskFullError(OVDError):
    """The disk (or quota) filled up while a file was written; the file it would replace is untouched."""


def _disk_full(e: BaseException | None, path: Path) -> DiskFullError | None:
    """A :class:`DiskFullError` when ``e`` (or an error it was raised from or during: torch reports a full
    disk as a ``RuntimeError`` raised while handling the ``OSError``) is ``ENOSPC``/``EDQUOT``."""
    for _ in range(5):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError("disk full while writing it; nothing was replaced (free space and rerun)", path=path)
        e = e.__cause__ or e.__context__
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder
    finally:
        os.close(fd)


def _finish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the umask's permissions, flush it, move it onto ``path`` and flush the folder."""
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def _replace_or_discard(tmp: str, path: Path) -> Iterator[None]:
    """Move ``tmp`` onto ``path`` when the body succeeds; otherwise delete ``tmp`` and re-raise.

    Raises:
        DiskFullError: the disk filled up (``ENOSPC``/``EDQUOT``), naming ``path``.
    """
    try:
        yield
        _finish(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _disk_full(e, path)
        if full is not None:
            raise full from e
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    Raises:
        DiskFullError: the disk filled up (``ENOSPC``/``EDQUOT``); the previous ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with _replace_or_discard(tmp, path), os.fdopen(fd, mode) as f:
        yield f


def atomic_write(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` to produce a file, then move it onto ``path`` atomically.

    For libraries that want a path rather than a file object (``np.save``, ``cv2.imwrite``). Not for
    ``torch.save``, whose path writer reports a full disk as an unrelated ``RuntimeError``: give it the
    file of :func:`atomic_open` (``"wb"``).

    Raises:
        DiskFullError: the disk filled up (``ENOSPC``/``EDQUOT``); the previous ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    with _replace_or_discard(tmp, path):
        writer(tmp)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`OVDError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise OVDError("file not found", path=path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise OVDError(f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})", path=path) from e
    except UnicodeDecodeError as e:
        raise OVDError("not a text JSON file", path=path) from e


# what a pickle of numpy arrays, numbers, strings and plain containers names, and nothing else
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name} is not a numpy array, number, string or container")
        return super().find_class(module, name)


def load_plain_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle a file that may hold only numpy arrays, numbers, strings, lists, tuples, dicts and sets.

    Any other global (a class, a function a ``__reduce__`` names) is refused before it is looked up,
    so no code in the file runs.

    Raises:
        OVDError: naming the file: missing, truncated, or holding other objects.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except FileNotFoundError as e:
        raise OVDError("file not found", path=path) from e
    except _RefusedGlobal as e:
        raise OVDError(f"refused pickle: {e}", path=path) from e
    except Exception as e:  # EOFError (truncated), ValueError, ...
        raise OVDError(f"cannot read pickle, truncated or corrupt ({type(e).__name__}: {e})", path=path) from e

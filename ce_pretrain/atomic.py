"""Atomic writes: every output (weights, configs, cards, figures, checkpoint folders) appears whole or not at all.

Folders are put in place and deleted by renames, so that a process killed at any moment (``kill -9`` included)
never leaves a folder that looks complete and is not: :func:`replace_dir` moves a finished temporary folder into
place, :func:`remove_dir` hides a folder before deleting it, and :func:`complete_dirs` finds the complete ones,
including the copy a kill between :func:`replace_dir`'s two renames leaves aside.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["complete_dirs", "ensure_writable_dir", "remove_dir", "remove_leftovers",
           "replace_dir", "write_atomic", "write_text_atomic"]

_OLD, _TRASH = ".old-", ".trash-"


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then ``os.replace`` it into place.

    A process killed mid-write leaves the previous file (or none) and at most a hidden temporary file, never a
    truncated ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove it writable by writing and removing a probe file.

    Checked before any work, so that a read-only or mistyped output folder fails at once, not after a long run.

    Raises:
        OSError: the folder cannot be created or written to (``strerror`` says why).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    return folder


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder so that nobody ever sees it half deleted.

    It is first renamed to a hidden ``.trash-`` sibling (one atomic rename), then deleted: a process killed while
    deleting leaves a hidden folder that no reader looks at, never ``path`` with some of its files gone (which
    folder listing order decides, so a completeness marker can outlive the weights beside it).
    """
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f"{_TRASH}{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder ``tmp`` in place of ``final``, whether or not ``final`` exists.

    An existing ``final`` is renamed aside to ``.old-<name>`` first and deleted only once ``tmp`` is in place: a
    kill at any moment leaves either ``final`` whole, or (between the two renames) its ``.old-`` copy whole, which
    :func:`complete_dirs` returns in its place.
    """
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(_OLD + final.name)
    remove_dir(old)
    os.replace(final, old)
    os.replace(tmp, final)
    remove_dir(old)


def complete_dirs(root: str | os.PathLike, prefix: str, marker: str) -> dict[str, Path]:
    """The complete folders ``root/<prefix>*`` (those holding the file ``marker``, written last), by name.

    A name whose folder is missing is answered by its ``.old-`` copy when a :func:`replace_dir` was killed between
    its two renames; the folder itself, once present, always wins.
    """
    root = Path(root)
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for path in sorted(root.iterdir()):
        name = path.name.removeprefix(_OLD)
        if name.startswith(prefix) and path.is_dir() and (path / marker).is_file():
            if path.name == name or name not in found:
                found[name] = path
    return found


def remove_leftovers(root: str | os.PathLike) -> None:
    """Tidy ``root`` after a killed save or delete: put back a ``.old-`` copy whose folder is missing (it is whole:
    such a copy is only ever made by renaming a complete folder, and deleted by :func:`remove_dir`), and delete the
    other hidden folders they leave (``.tmp-*``, ``.*.tmp``, ``.old-*``, ``.trash-*``). Only for a folder a single
    process writes to (the run's lock), never while a save into it is under way.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if not path.is_dir() or not path.name.startswith("."):
            continue
        if path.name.startswith(_OLD) and not (root / path.name.removeprefix(_OLD)).exists():
            os.replace(path, root / path.name.removeprefix(_OLD))
        elif path.name.startswith((".tmp-", _OLD, _TRASH)) or path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)

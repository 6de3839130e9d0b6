"""Paths that must be ours: state only we may read, code only we may have written, folders only
we may delete.

Three callers, three rules. The cluster launcher keeps tokens and process ids in a directory
nobody else may enter (`private_dir`, files written with `open_private`, which never follows a
link). The native kernels' cache holds code we load into the process: `unsafe_reason` says why a
cached directory or file must not be trusted (a link, another owner, writable by others).
Commands that replace a folder they wrote before (`ladder adapt --out`, an adaptation run's
folder) delete it only if it is missing, empty, or holds a file that marks it as theirs
(`check_replaceable`); anything else needs `--force`, and a symbolic link is never followed.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO


class UnsafePath(RuntimeError):
    """A path is not safely ours to use or delete; the message names it and says why."""


def unsafe_reason(path: Path, *, directory: bool, others_read: bool) -> str:
    """'' when `path` (not followed if a link) is ours and nobody else may change it, else why
    not. `others_read`: whether group and others may read it (a cache may; a secret may not)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & (0o022 if others_read else 0o077):
        who = "write to" if others_read else "reach into" if directory else "read"
        return f"mode {mode:04o} lets group or others {who} it"
    return ""


def private_dir(path: Path, *, create: bool) -> Path:
    """`path` as a directory only this user can enter: made with mode 0700 when missing and
    `create`, else checked (a missing one is left missing). An existing one that is a link, not
    ours, or open to others is refused rather than repaired: whoever could reach into it may have
    left files there that we would then trust."""
    if create:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
    elif not os.path.lexists(path):
        return path
    why = unsafe_reason(path, directory=True, others_read=False)
    if why:
        raise UnsafePath(f"{path}: {why}; it must be a directory of this user's that only it can"
                         " enter (remove it, or `chmod 700` it if you made it and trust what it "
                         "holds)")
    return path


def open_private(path: Path) -> BinaryIO:
    """`path` opened for writing (created 0600, truncated), never through a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    return os.fdopen(fd, "wb")


def check_replaceable(folder: Path, marks: tuple[str, ...], *, force: bool, what: str) -> None:
    """Raise UnsafePath unless `folder` may be deleted to make way for a new one of ours: it is
    missing, empty, holds one of the files `marks` (which only we write there), or `force`.
    `what` names the folder for the user (`--out adapted/`). A symbolic link is refused even
    with `force`: deleting through it would delete what it points to."""
    if os.path.islink(folder):
        raise UnsafePath(f"{what} is a symbolic link (to {os.readlink(folder)}): name the "
                         "folder itself")
    if force or not os.path.lexists(folder):
        return
    if not folder.is_dir():
        raise UnsafePath(f"{what} is a file, not a folder; pass --force to replace it")
    if any(folder.iterdir()) and not any((folder / m).is_file() for m in marks):
        raise UnsafePath(f"{what} is not empty and was not written by this command (it has no "
                         f"{' or '.join(marks)}): it would be deleted; pass --force to replace "
                         "it, or choose another folder")


def remove(folder: Path) -> None:
    """Delete `folder` (a file, or a whole tree; links inside are removed, never followed),
    after `check_replaceable` allowed it."""
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    elif os.path.lexists(folder):
        folder.unlink()

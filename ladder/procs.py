"""The process table as /proc shows it: what is alive, what a process runs, who started whom.

For code that must end exactly the processes it started (by id, never by a name pattern): the
cluster launcher, `ladder serve` run by benchmarks, the tests' Ray clusters.
"""

from __future__ import annotations

import os


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state, ppid, pgrp, session, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped, is not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cpu_seconds(pid: int) -> float:
    """CPU seconds `pid` has used, user and system, with its reaped children's; 0 when gone."""
    fields = _stat(pid)
    return 0.0 if fields is None else sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int, limit: int = 200) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    except OSError:
        return "?"


def _table() -> dict[int, tuple[int, int, int]]:
    """Live pid -> (parent, session, start time in ticks)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            fields = _stat(d)
            if fields is not None and fields[0] not in ("Z", "X"):
                out[int(d)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return out


def descendants(pid: int, *, session: bool = False) -> list[int]:
    """Every live descendant of `pid`, oldest first; with `session`, also the members of the
    session `pid` leads (daemons that left the tree)."""
    table = _table()
    ours = {p for p, (_, sid, _) in table.items() if session and sid == pid and p != pid}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, _, _) in table.items():
            if ppid == parent and p not in ours:
                ours.add(p)
                todo.append(p)
    return sorted(ours, key=lambda p: table[p][2])

"""Network namespaces for a local group's ranks: each rank in its own namespace, at its own
address there, so that its links cross whatever joins the namespaces (a shaped veth pair)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ladder.options import GroupOptions


@dataclass(frozen=True, slots=True)
class Namespaces:
    """Where a local group's ranks run: rank r in network namespace `names[r]` (as `ip netns
    add` makes it), its gloo and links bound to `hosts[r]`."""

    names: tuple[str, ...]
    hosts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.hosts):
            raise ValueError(f"namespaces and hosts need one entry per rank, got "
                             f"{list(self.names)} and {list(self.hosts)}")

    def check(self, tp: int) -> None:
        if len(self.names) != tp:
            raise ValueError(f"namespaces need one entry per rank (tp={tp}), got "
                             f"{list(self.names)}")

    def enter(self, opts: GroupOptions, rank: int) -> GroupOptions:
        """In rank `rank`'s own process, first thing: move into its namespace; the options with
        its address there as `host`."""
        enter_netns(self.names[rank])
        return replace(opts, host=self.hosts[rank])


def enter_netns(name: str) -> None:
    """Move this process into the network namespace `name` (/var/run/netns/<name>, as `ip netns
    add` makes it). Call it before any thread or socket exists: only the calling thread moves,
    and threads started later inherit its namespace."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, f"entering network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)

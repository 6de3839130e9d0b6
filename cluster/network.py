"""A launched cluster's network: namespaces joined to a bridge by veths that `tc` shapes.

Node `i` of cluster `<name>` is the network namespace `lsc-<name>-<i>`; its `eth0` is one end of
a veth pair whose other end, `lsv<name>n<i>`, sits on the bridge `lsb<name>` in the root
namespace (the bridge holds the subnet's .1, so this host reaches every node). A shaped link has
`tc tbf` on both ends of its veth (egress each way). All of it is named after the cluster, so
`leftovers` and `remove_network` find it again from the name alone, after a crash as well.
`veth_pair` makes just two namespaces joined by one shaped veth: a local group's, without Ray.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cluster.links import Link
from cluster.state import ClusterError, ClusterState, NodeState

_NAME = re.compile(r"^[a-z0-9]{1,6}$")  # interface names are at most 15 characters


def check_name(name: str, what: str) -> None:
    """Raise ClusterError unless `name` fits in the interface names made after it."""
    if not _NAME.match(name):
        raise ClusterError(f"{what} {name!r}: 1-6 lowercase letters or digits")


# -- shell -------------------------------------------------------------------------------------
def _sh(*cmd: str, check: bool = True, env: dict | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()}")
    return p.stdout


def in_ns(ns: str, *cmd: str) -> tuple[str, ...]:
    """`cmd` run in namespace `ns` ('': in this one, as a plain node's)."""
    return ("ip", "netns", "exec", ns, *cmd) if ns else cmd


def namespaces_allowed() -> str:
    """'' when this process may create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"lscprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns add` is refused here: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


# -- names -------------------------------------------------------------------------------------
def names(name: str) -> tuple[re.Pattern, str, re.Pattern]:
    """(namespace pattern, bridge, host-side veth pattern) of cluster `name`."""
    return (re.compile(rf"^lsc-{name}-(\d+)$"), f"lsb{name}", re.compile(rf"^lsv{name}n(\d+)$"))


def _netns_list() -> list[str]:
    out = _sh("ip", "netns", "list", check=False) if shutil.which("ip") else ""
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _sh("ip", "-o", "link", "show", check=False) if shutil.which("ip") else ""
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def cluster_namespaces(name: str) -> list[str]:
    """The namespaces of cluster `name` there are now."""
    ns_pat, _, _ = names(name)
    return [n for n in _netns_list() if ns_pat.match(n)]


def leftovers(name: str) -> list[str]:
    """What of cluster `name`'s network there is now: namespaces, the bridge, veths."""
    _, bridge, veth_pat = names(name)
    out = cluster_namespaces(name)
    out += [link for link in _links() if link == bridge or veth_pat.match(link)]
    return out


# -- make --------------------------------------------------------------------------------------
def pick_subnet(name: str) -> str:
    """A 10.87.x (/24) that no address or route of this host uses, tried from one the name picks."""
    used = _sh("ip", "-o", "addr", "show", check=False) + _sh("ip", "route", check=False)
    start = zlib.crc32(name.encode()) % 200
    for k in range(200):
        subnet = f"10.87.{20 + (start + k) % 200}"
        if f"{subnet}." not in used:
            return subnet
    raise ClusterError("no free 10.87.x.0/24 subnet for the cluster's bridge")


def loopback_mtu() -> int:
    """The MTU a plain cluster's links have: loopback's own."""
    try:
        return int(Path("/sys/class/net/lo/mtu").read_text())
    except (OSError, ValueError):
        return 65536


def make_network(st: ClusterState, links: list[Link]) -> None:
    """The bridge, and for each node its namespace and veth, shaped like its link (`st.mtu` on
    every interface). Raises ClusterError at the first command that fails."""
    mtu = str(st.mtu)
    _sh("ip", "link", "add", st.bridge, "mtu", mtu, "type", "bridge")
    _sh("ip", "addr", "add", f"{st.subnet}.1/24", "dev", st.bridge)
    _sh("ip", "link", "set", st.bridge, "up")
    for node, link in zip(st.nodes, links):
        _sh("ip", "netns", "add", node.ns)
        _sh("ip", "link", "add", node.veth, "mtu", mtu, "type", "veth", "peer", "name", "eth0",
            "mtu", mtu, "netns", node.ns)
        _sh("ip", "link", "set", node.veth, "master", st.bridge)
        _sh("ip", "link", "set", node.veth, "up")
        _sh(*in_ns(node.ns, "ip", "addr", "add", f"{node.ip}/24", "dev", "eth0"))
        _sh(*in_ns(node.ns, "ip", "link", "set", "eth0", "up"))
        _sh(*in_ns(node.ns, "ip", "link", "set", "lo", "up"))
        if link.rate_bit:  # both directions: the node's egress and the bridge's egress to it
            _sh("tc", "qdisc", "add", "dev", node.veth, "root", *link.tbf_args(st.mtu))
            _sh(*in_ns(node.ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                       *link.tbf_args(st.mtu)))


@contextmanager
def veth_pair(link: Link, tag: str, mtu: int = 1500
              ) -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Two network namespaces, `lsc-<tag>-0` and `lsc-<tag>-1`, joined by one veth pair of
    `mtu` whose ends are shaped like `link` (tbf; the veth as it is for high-end): for a local
    group's two ranks (`GroupOptions.netns`), without Ray. Yields (namespaces, addresses);
    both namespaces, and with them the pair, are removed on exit, whatever happened. Raises
    ClusterError where namespaces cannot be made (namespaces_allowed says why)."""
    check_name(tag, "veth pair tag")
    why = namespaces_allowed()
    if why:
        raise ClusterError(why)
    ns = (f"lsc-{tag}-0", f"lsc-{tag}-1")
    ends = (f"lsv{tag}n0", f"lsv{tag}n1")
    ips = ("10.88.0.1", "10.88.0.2")  # each in its own namespace: nothing else can see them
    try:
        for n in ns:
            _sh("ip", "netns", "add", n)
        _sh("ip", "link", "add", ends[0], "netns", ns[0], "type", "veth", "peer", "name",
            ends[1], "netns", ns[1])
        for n, end, ip in zip(ns, ends, ips):
            _sh(*in_ns(n, "ip", "addr", "add", f"{ip}/24", "dev", end))
            _sh(*in_ns(n, "ip", "link", "set", end, "mtu", str(mtu), "up"))
            _sh(*in_ns(n, "ip", "link", "set", "lo", "up"))
            if link.rate_bit:
                _sh(*in_ns(n, "tc", "qdisc", "add", "dev", end, "root", *link.tbf_args(mtu)))
        yield ns, ips
    finally:
        for n in ns:
            _sh("ip", "netns", "del", n, check=False)


# -- remove ------------------------------------------------------------------------------------
def namespace_pids(namespaces: list[str]) -> list[int]:
    """The processes in `namespaces` (in a cluster's: Ray's, by construction ours)."""
    pids = []
    for ns in namespaces:
        pids += [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).split()]
    return pids


def remove_network(name: str, namespaces: list[str]) -> list[str]:
    """Delete `namespaces` (cluster `name`'s, their processes ended), then the cluster's bridge
    and whatever veth is left; what was removed."""
    _, bridge, veth_pat = names(name)
    removed = []
    for ns in namespaces:
        _sh("ip", "netns", "del", ns, check=False)
        removed.append(f"namespace {ns}")
    for link in _links():
        if link == bridge or veth_pat.match(link):
            _sh("ip", "link", "del", link, check=False)
            removed.append(f"link {link}")
    return removed


# -- status ------------------------------------------------------------------------------------
def node_mtu(node: NodeState) -> int:
    """The MTU the node's link has now (0 if it is gone)."""
    out = _sh(*in_ns(node.ns, "ip", "-o", "link", "show", "dev", "eth0"), check=False)
    m = re.search(r" mtu (\d+)", out)
    return int(m[1]) if m else 0


def node_qdisc(node: NodeState) -> str:
    """How the node's link is shaped now, as `status` shows it."""
    out = _sh(*in_ns(node.ns, "tc", "qdisc", "show", "dev", "eth0"), check=False)
    m = re.search(r"tbf .*?rate (\S+)", out)
    return f"tbf {m[1]}" if m else "unshaped veth"

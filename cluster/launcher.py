"""A local multi-node Ray cluster whose nodes are joined by shaped links.

Each node is a network namespace (`lsc-<name>-<i>`) with a veth pair to a bridge in the root
namespace (`lsb<name>`, which holds the subnet's .1 so this host reaches every node). A node's
link is shaped with `tc tbf` on both ends of its veth (egress each way), so traffic between two
nodes crosses both nodes' links: the slower profile decides (cluster.network makes all of it).
A Ray head (node 0) and workers run inside the namespaces, token authentication on, each
labelled with its link profile (`ladder.io/link`, plus `ladder.io/emu-latency-us` for an
emulated latency), which is what TP groups place on and what the metrics' `interconnect` label
says.

Everything it makes is named after the cluster, so `down` finds it all again from the names
alone, after a crash as well: the namespaces (and every process in them: Ray's, by construction
ours), the veths, the bridge and the state folder. `--plain` (no root, or no namespaces) starts
the same nodes on loopback, unshaped, and `down` ends them by their process session.

The state folder (`state_root()`) holds the clusters' Ray token and the process ids `down` ends,
so only this user may enter it: `$LADDER_CLUSTER_STATE` if set, else
`$XDG_RUNTIME_DIR/ladder-cluster`, else `/run/ladder-cluster` for root, else
`<tmp>/ladder-cluster-<uid>`. It is made with mode 0700; one that already exists must be this
user's, not a link and closed to others, or the launcher refuses it (see ladder.private).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from actors.group import LATENCY_LABEL, LINK_LABEL
from cluster.links import DEFAULT_MTU, Link, check_mtu
from cluster.network import (check_name, cluster_namespaces, in_ns, leftovers, loopback_mtu,
                             make_network, namespace_pids, namespaces_allowed, names, node_mtu,
                             node_qdisc, pick_subnet, remove_network)
from cluster.state import (ClusterError, ClusterState, NodeState, load_state, ray_env, save_state,
                           state_dir, token_path)
from ladder.private import open_private
from ladder.procs import alive

METRICS_PORT = 8090  # each node's metrics agent, inside its own namespace
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node: the benchmarks move tokens, not tensors


# -- up ----------------------------------------------------------------------------------------
def up(name: str, links: list[Link], *, cpus: int, head_cpus: int = 0, plain: bool = False,
       mtu: int = DEFAULT_MTU, timeout_s: float = 90.0, log=print) -> ClusterState:
    """Create the nodes and their links (`mtu` on each, the bridge too), start Ray on them,
    wait until all are alive."""
    check_mtu(mtu)
    check_name(name, "cluster name")
    if load_state(name) is not None or leftovers(name):
        raise ClusterError(f"a cluster named {name!r} is already up (or left over from a crash):"
                           f" `ladder cluster down --name {name}` first")
    if not plain:
        why = namespaces_allowed()
        if why:
            raise ClusterError(f"cannot shape links here: {why}. `ladder cluster up --plain` "
                               "starts the same nodes on loopback, without shaped links")
    if plain:  # loopback has one speed: a plain cluster's nodes are all `loopback`
        shaped = sorted({link.spec for link in links if link.rate_bit})
        if shaped:
            raise ClusterError(f"--plain cannot shape links ({', '.join(shaped)}): it runs "
                               "without network namespaces")
        links = [Link("loopback", 0, link.latency_s) for link in links]
    t0 = time.monotonic()
    state_dir(name, create=True)
    with open_private(token_path(name)) as f:
        f.write(secrets.token_hex(32).encode())
    _, bridge, _ = names(name)
    subnet = "" if plain else pick_subnet(name)
    st = ClusterState(name=name, plain=plain, subnet=subnet, bridge="" if plain else bridge,
                      started=time.time(), mtu=loopback_mtu() if plain else mtu)
    if plain:
        st.port, st.dashboard_port = _listen_port(), _listen_port()
    for i, link in enumerate(links):
        st.nodes.append(NodeState(
            index=i, ip="127.0.0.1" if plain else f"{subnet}.{10 + i}", link=link.spec,
            cpus=head_cpus if i == 0 else cpus,
            ns="" if plain else f"lsc-{name}-{i}", veth="" if plain else f"lsv{name}n{i}"))
    save_state(st)  # from here on, `down` can undo whatever comes next
    try:
        if not plain:
            make_network(st, links)
        _start_ray(st, links, timeout_s, log)
    except BaseException:
        down(name, log=lambda *_: None)
        raise
    st.ready_s = time.monotonic() - t0
    save_state(st)
    return st



def _ray_start_args(st: ClusterState, node: NodeState, link: Link) -> list[str]:
    ray = str(Path(sys.executable).with_name("ray"))
    labels = f"{LINK_LABEL}={link.label}"
    if link.latency_s:
        labels += f",{LATENCY_LABEL}={round(link.latency_s * 1e6)}"
    args = [ray, "start", "--block", "--node-ip-address", node.ip, "--num-cpus", str(node.cpus),
            "--temp-dir", str(state_dir(st.name) / f"n{node.index}"),
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--labels", labels,
            "--disable-usage-stats"]
    if node.index == 0:
        args += ["--head", "--port", str(st.port), "--include-dashboard", "true",
                 "--dashboard-host", "0.0.0.0", "--dashboard-port", str(st.dashboard_port)]
    else:
        args += ["--address", st.address]
    if st.plain:  # one address for every node: each needs ports of its own
        args += _plain_ports(node.index)
    else:
        args += ["--metrics-export-port", str(METRICS_PORT)]
    return args


def _plain_ports(i: int) -> list[str]:
    flags = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port") + (("--ray-client-server-port",) if i == 0 else ())
    return [x for flag in flags for x in (flag, str(_listen_port()))]


_PICKED: set[int] = set()  # ports handed out by this process: no two nodes get the same one


def _listen_port() -> int:
    """A free port for a plain node's Ray to listen on, between Ray's worker ports
    (10002-19999) and the kernel's ephemeral range (ip_local_port_range). A port-0 pick lies in
    the ephemeral range, which the kernel also hands to outgoing connections: seen taken by one
    in the moment before Ray bound it ('Address already in use' on the client server port)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        if port in _PICKED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every address: a socket on any of them conflicts
            except OSError:
                continue
        _PICKED.add(port)
        return port
    raise ClusterError(f"no free port between 20000 and {low}")


def _start_ray(st: ClusterState, links: list[Link], timeout_s: float, log) -> None:
    env = ray_env(st.name)
    env.pop("RAY_ADDRESS", None)
    logs = state_dir(st.name)
    for node, link in zip(st.nodes, links):
        with open_private(logs / f"n{node.index}.log") as out:
            # `--block`: the node's processes stay under this session, so a plain cluster's
            # `down` finds them by session id (a namespace's are found by namespace)
            p = subprocess.Popen(in_ns(node.ns, *_ray_start_args(st, node, link)), env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node.sid = p.pid
        save_state(st)
        if node.index == 0:
            _wait_alive(st, 1, timeout_s, log)
    _wait_alive(st, len(st.nodes), timeout_s, log)


def alive_nodes(st: ClusterState) -> list[dict]:
    """The cluster's alive nodes as its GCS knows them: [{ip, labels, resources}]."""
    code = ("import json, ray._raylet\n"
            f"c = ray._raylet.GcsClient(address={st.address!r})\n"
            "out = []\n"
            "for n in c.get_all_node_info(timeout=5).values():\n"
            "    if n.state == 0:\n"  # ALIVE
            "        out.append({'ip': n.node_manager_address, 'labels': dict(n.labels),"
            " 'resources': dict(n.resources_total)})\n"
            "print(json.dumps(out))\n")
    env = ray_env(st.name)
    p = subprocess.run(in_ns(st.head.ns, sys.executable, "-c", code), capture_output=True,
                       text=True, env=env, timeout=60)
    if p.returncode != 0:
        raise ClusterError(f"cannot reach the cluster's GCS at {st.address}: "
                           f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else '?'}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _wait_alive(st: ClusterState, n: int, timeout_s: float, log) -> None:
    deadline = time.monotonic() + timeout_s
    why = ""
    while time.monotonic() < deadline:
        dead = [node.index for node in st.nodes[:n] if not _session_alive(node)]
        if dead:
            tail = (state_dir(st.name) / f"n{dead[0]}.log").read_text(errors="replace")[-2000:]
            raise ClusterError(f"Ray on node {dead[0]} exited while starting:\n{tail}")
        try:
            got = len(alive_nodes(st))
            if got >= n:
                return
            now = f"{got} of {n} nodes alive"
        except ClusterError as e:
            now = str(e)
        if now != why:  # progress, said once per change
            log(now)
        why = now
        time.sleep(1.0)
    raise ClusterError(f"cluster {st.name!r} not ready within {timeout_s} s: {why} "
                       f"(logs in {state_dir(st.name)})")


def _session_alive(node: NodeState) -> bool:
    """Whether the node's `ray start --block` (its session leader) still runs."""
    return alive(node.sid)


# -- down --------------------------------------------------------------------------------------

def _pids_of_session(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def _end(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = [p for p in pids if alive(p)]
            if not pids:
                return
            time.sleep(0.1)


def down(name: str, log=print) -> list[str]:
    """Remove everything cluster `name` made; what was removed. Idempotent."""
    check_name(name, "cluster name")
    removed = []
    st = None
    try:
        st = load_state(name)
    except ClusterError:
        pass
    # processes first: Ray in a namespace is ours by construction; a plain node's by session
    namespaces = cluster_namespaces(name)
    pids = namespace_pids(namespaces)
    if st is not None:
        for node in st.nodes:
            if node.sid:
                pids += _pids_of_session(node.sid)
    pids = sorted(set(pids) - {os.getpid()})
    if pids:
        _end(pids)
        removed.append(f"{len(pids)} processes")
    removed += remove_network(name, namespaces)
    d = state_dir(name)
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"state {d}")
    try:
        d.parent.rmdir()  # the state root too, once no cluster is left in it
    except OSError:
        pass
    left = leftovers(name)
    if left:
        raise ClusterError(f"cluster {name!r}: could not remove {', '.join(left)}")
    return removed


# -- status ------------------------------------------------------------------------------------
def status(name: str) -> dict:
    """What is up: the nodes with their link shaping, and what Ray says is alive."""
    st = load_state(name)
    if st is None:
        left = leftovers(name)
        return {"name": name, "up": False, "leftovers": left}
    nodes = []
    for node in st.nodes:
        shaping = "loopback (plain)" if st.plain else node_qdisc(node)
        nodes.append({"index": node.index, "ip": node.ip, "link": node.link, "cpus": node.cpus,
                      "namespace": node.ns, "shaping": shaping,
                      "mtu": st.mtu if st.plain else node_mtu(node),
                      "running": _session_alive(node)})
    try:
        known = alive_nodes(st)
    except (ClusterError, subprocess.TimeoutExpired) as e:
        known, err = [], str(e)
    else:
        err = ""
    return {"name": name, "up": True, "plain": st.plain, "mtu": st.mtu, "address": st.address,
            "dashboard": st.dashboard, "token_path": str(token_path(name)),
            "ready_s": round(st.ready_s, 1), "nodes": nodes, "ray_alive": len(known),
            "ray_labels": sorted({n["labels"].get(LINK_LABEL, "?") for n in known}),
            **({"error": err} if err else {})}

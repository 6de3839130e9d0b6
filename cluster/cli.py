"""`ladder cluster up|status|down|exec`: a local multi-node Ray cluster with shaped links.

  ladder cluster up --nodes 3 --link high-end          # unshaped veth links
  ladder cluster up --nodes 3 --link cheap             # 1 Gbit/s (tbf) on every node's link
  ladder cluster up --nodes 5 --link high-end,high-end,high-end,cheap,cheap   # one per node
  ladder cluster up --nodes 3 --link 100mbit@200us     # a rate, plus emulated latency
  ladder cluster exec -- ladder serve --address auto   # a driver inside the head's namespace
  ladder cluster down                                  # idempotent, also after a crash

Node 0 is the head (no CPUs for tasks by default: TP ranks land on workers, whose links are the
ones being compared). Needs root for namespaces; `--plain` runs the same nodes unshaped on
loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# the launcher (and through it Ray) is imported when a subcommand runs, not when the `ladder`
# dispatcher builds its parser: Ray reads RAY_AUTH_MODE once, at import, and `ladder serve`
# sets it first


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="a local multi-node Ray cluster with shaped links",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="cluster_cmd", required=True, metavar="up|status|down|exec")
    u = cmds.add_parser("up", help="create the nodes, shape their links, start Ray")
    u.add_argument("--nodes", type=int, default=3, help="Ray nodes, the head included")
    u.add_argument("--link", default="high-end",
                   help="high-end | cheap | a rate (1gbit, 100mbit), optionally @<latency> "
                        "(emulated); one for all nodes or a comma list, head first")
    u.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="logical CPUs of each worker node")
    u.add_argument("--head-cpus", type=int, default=0, help="logical CPUs of the head")
    u.add_argument("--mtu", type=int, default=None,
                   help="every link's MTU, the bridge's too (default 9000, jumbo frames: a "
                        "shaped veth cuts and handles frames on the cores that compute, which a "
                        "NIC does in hardware)")
    u.add_argument("--plain", action="store_true",
                   help="no namespaces or shaping: the nodes on loopback (no root needed)")
    u.add_argument("--timeout", type=float, default=90.0)
    s = cmds.add_parser("status", help="nodes, links and what Ray reports alive")
    s.add_argument("--json", action="store_true")
    cmds.add_parser("down", help="remove every namespace, link and Ray process it made")
    e = cmds.add_parser("exec", help="run a command in the head's namespace, connected")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    for c in (u, s, e, cmds.choices["down"]):
        c.add_argument("--name", default="ladder", help="the cluster's name (default ladder)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from cluster.launcher import ClusterError
    try:
        return {"up": _up, "status": _status, "down": _down, "exec": _exec}[a.cluster_cmd](a)
    except (ClusterError, ValueError) as e:
        print(f"ladder cluster {a.cluster_cmd}: {e}", file=sys.stderr)
        return 2


def _up(a: argparse.Namespace) -> int:
    from cluster.launcher import LINK_LABEL, ClusterError, token_path, up
    from cluster.links import DEFAULT_MTU, parse_links
    if a.nodes < 1:
        raise ClusterError("--nodes must be at least 1")
    links = parse_links(a.link, a.nodes)
    if a.plain and a.mtu is not None:
        raise ClusterError("--plain runs on loopback, whose MTU is its own: drop --mtu")
    mtu = DEFAULT_MTU if a.mtu is None else a.mtu  # up() checks it
    st = up(a.name, links, cpus=a.cpus, head_cpus=a.head_cpus, plain=a.plain, mtu=mtu,
            timeout_s=a.timeout)
    print(f"cluster {st.name!r}: {len(st.nodes)} Ray nodes ready in {st.ready_s:.1f} s"
          + ("" if st.plain else f", links of MTU {st.mtu}"))
    for n in st.nodes:
        where = "loopback" if st.plain else n.ns
        print(f"  node {n.index} {'head  ' if n.index == 0 else 'worker'} {n.ip:<12} "
              f"{where:<14} {LINK_LABEL}={n.link}  cpus={n.cpus}")
    print(f"address   {st.address}   (token auth: RAY_AUTH_MODE=token "
          f"RAY_AUTH_TOKEN_PATH={token_path(st.name)})")
    print(f"dashboard {st.dashboard}")
    ns = "" if st.plain else f"ip netns exec {st.head.ns} "
    print(f"a driver: ladder cluster exec --name {st.name} -- <command>   (or: {ns}env "
          f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_path(st.name)} "
          f"RAY_ADDRESS={st.address} <command>)")
    return 0


def _status(a: argparse.Namespace) -> int:
    from cluster.launcher import status
    s = status(a.name)
    if a.json:
        print(json.dumps(s, indent=1))
        return 0 if s["up"] else 1
    if not s["up"]:
        left = s["leftovers"]
        print(f"cluster {a.name!r} is not up" + (f"; left over: {', '.join(left)} "
                                                 f"(ladder cluster down)" if left else ""))
        return 1
    print(f"cluster {a.name!r}{' (plain)' if s['plain'] else ''}: {s['ray_alive']} of "
          f"{len(s['nodes'])} Ray nodes alive, address {s['address']}")
    for n in s["nodes"]:
        print(f"  node {n['index']} {n['ip']:<12} {n['link']:<14} {n['shaping']:<16} "
              f"mtu={n['mtu']} cpus={n['cpus']} {'running' if n['running'] else 'NOT RUNNING'}")
    if "error" in s:
        print(f"  {s['error']}")
    return 0 if s["ray_alive"] == len(s["nodes"]) else 1


def _down(a: argparse.Namespace) -> int:
    from cluster.launcher import down
    t0 = time.monotonic()
    removed = down(a.name)
    what = "; ".join(removed) if removed else "nothing was up"
    print(f"cluster {a.name!r} down in {time.monotonic() - t0:.1f} s: {what}")
    return 0


def _exec(a: argparse.Namespace) -> int:
    from cluster.launcher import ClusterError, load_state, ray_env
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not argv:
        raise ClusterError("exec needs a command after --")
    st = load_state(a.name)
    if st is None:
        raise ClusterError(f"cluster {a.name!r} is not up")
    prefix = [] if st.plain else ["ip", "netns", "exec", st.head.ns]
    os.execvpe((prefix or argv)[0], prefix + argv, ray_env(a.name))
    return 0  # not reached

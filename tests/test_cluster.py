"""The local multi-node launcher: real namespaces, veths, a bridge, tbf-shaped links, Ray nodes.

One 4-node cluster for the module (head and two workers on high-end links, one worker on a
cheap 1 Gbit/s link), driven by drivers inside the head's namespace as users run them; it comes
down at the end, and the test checks nothing of it is left (namespaces, links, state, processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import launcher
from cluster.links import Link, parse_link, parse_links

LADDER = str(Path(sys.executable).with_name("ladder"))
NAME = "ltest"


def ladder(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([LADDER, *args], capture_output=True, text=True, timeout=timeout)


def in_head(code: str, name: str = NAME, timeout: float = 300) -> str:
    """Run a Python driver in the head's namespace, connected (`ladder cluster exec`)."""
    p = ladder("cluster", "exec", "--name", name, "--", sys.executable, "-c", code,
               timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def nothing_left(name: str, pids: list[int]) -> list[str]:
    left = launcher._leftovers(name)
    if launcher.state_dir(name).exists():
        left.append(str(launcher.state_dir(name)))
    left += [f"pid {p}" for p in pids if launcher._pid_alive(p)]
    return left


def test_link_profiles():
    assert parse_link("high-end") == Link("high-end", 0)
    assert parse_link("cheap") == Link("cheap", 1_000_000_000)
    assert parse_link("100mbit") == Link("100mbit", 100_000_000)
    assert parse_link("2.5gbit@200us") == Link("2.5gbit", 2_500_000_000, 200e-6)
    assert parse_link("cheap@2ms").spec == "cheap@2000us"
    assert [x.label for x in parse_links("high-end,cheap,cheap", 3)] == ["high-end", "cheap",
                                                                           "cheap"]
    assert len(parse_links("cheap", 4)) == 4
    assert "tbf" in parse_link("cheap").tbf_args()
    for bad, msg in [("fast", "not a profile"), ("cheap@soon", "latency"),
                     ("10kbit", "below 1mbit"), ("", "empty")]:
        with pytest.raises(ValueError, match=msg):
            parse_links(bad, 2)
    with pytest.raises(ValueError, match="2 profiles for 3 nodes"):
        parse_links("cheap,high-end", 3)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root "
                                "(CI runs as root)")


@pytest.fixture(scope="module")
def shaped():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    launcher.down(NAME, log=lambda *_: None)  # a crashed earlier run's left-overs
    t0 = time.monotonic()
    p = ladder("cluster", "up", "--name", NAME, "--nodes", "4",
               "--link", "high-end,high-end,high-end,cheap", "--cpus", "2")
    up_s = time.monotonic() - t0
    try:
        assert p.returncode == 0, p.stderr[-3000:]
        st = launcher.load_state(NAME)
        yield st, p.stdout, up_s
    finally:
        pids = [int(x) for n in (launcher.load_state(NAME) or st).nodes
                for x in subprocess.run(["ip", "netns", "pids", n.ns], capture_output=True,
                                        text=True).stdout.split()] if launcher.load_state(NAME) \
            else []
        t0 = time.monotonic()
        d = ladder("cluster", "down", "--name", NAME)
        print(f"cluster up {up_s:.1f} s, down {time.monotonic() - t0:.1f} s")
        assert d.returncode == 0, d.stderr
        assert nothing_left(NAME, pids) == []


@needs_root
def test_up_prints_address_and_status(shaped):
    st, out, up_s = shaped
    assert f"address   {st.head.ip}:6379" in out and "RAY_AUTH_MODE=token" in out
    assert "4 Ray nodes ready" in out
    s = json.loads(ladder("cluster", "status", "--name", NAME, "--json").stdout)
    assert s["up"] and s["ray_alive"] == 4
    assert s["ray_labels"] == ["cheap", "high-end"]
    shaping = [n["shaping"] for n in s["nodes"]]
    assert shaping[:3] == ["unshaped veth"] * 3 and shaping[3] == "tbf 1Gbit"
    assert oct(launcher.token_path(NAME).stat().st_mode & 0o777) == "0o600"
    # a second `up` of the same name is refused, clearly, and harms nothing
    again = ladder("cluster", "up", "--name", NAME, "--nodes", "2")
    assert again.returncode == 2 and "already up" in again.stderr
    assert json.loads(ladder("cluster", "status", "--name", NAME, "--json").stdout)[
        "ray_alive"] == 4


@needs_root
def test_cheap_link_is_slower_for_a_large_allreduce(shaped):
    st = shaped[0]
    ips = [n.ip for n in st.nodes]
    out = in_head(
        "import json, ray\n"
        "from cluster.probe import allreduce_time\n"
        "ray.init()\n"
        f"he = allreduce_time({ips[1]!r}, {ips[2]!r}, 4 << 20)\n"
        f"ch = allreduce_time({ips[1]!r}, {ips[3]!r}, 4 << 20)\n"
        "print(json.dumps([he, ch]))\n")
    he, ch = json.loads(out.strip().splitlines()[-1])
    print(f"4 MiB all-reduce: high-end {he * 1e3:.1f} ms, cheap {ch * 1e3:.1f} ms "
          f"({ch / he:.1f}x)")
    assert ch > 2 * he  # 1 Gbit/s moves 4 MiB in >= 33 ms; the veth takes a few


@needs_root
def test_tp_group_takes_the_link_label_of_its_nodes(shaped, tiny_llama):
    code = (
        "import ray\n"
        "from actors.group import TPGroup\n"
        "from ladder.runner import GroupOptions\n"
        "from ladder.sampling import SamplingParams\n"
        "ray.init()\n"
        f"opts = GroupOptions(model={str(tiny_llama)!r}, tp=2, residual='ladder', n_slots=2,"
        " max_seq=64, threads=1)\n"
        "with TPGroup(opts, strategy='STRICT_SPREAD', link='high-end', metrics=False) as g:\n"
        "    ips = sorted(n['ip'] for n in g.nodes)\n"
        "    out = g.generate([[1, 2, 3]], SamplingParams(max_tokens=4))\n"
        "    print(g.info['interconnect'], g.opts.comm, ','.join(ips), len(out[0]['tokens']))\n")
    line = in_head(code).strip().splitlines()[-1]
    label, comm, ips, n = line.split()
    st = shaped[0]
    assert (label, comm, n) == ("high-end", "gloo", "4")
    assert ips == f"{st.nodes[1].ip},{st.nodes[2].ip}"  # the high-end workers, not the cheap one


@needs_root
def test_down_after_a_crash_finds_everything_by_name():
    name = "lcrash"
    launcher.down(name, log=lambda *_: None)
    st = launcher.up(name, parse_links("cheap", 2), cpus=1, log=lambda *_: None)
    pids = [int(x) for n in st.nodes for x in
            subprocess.run(["ip", "netns", "pids", n.ns], capture_output=True,
                           text=True).stdout.split()]
    try:
        assert pids
        # the launcher's state is lost (a crash, a wiped /tmp): the names still lead to it all
        shutil.rmtree(launcher.state_dir(name))
        assert ladder("cluster", "status", "--name", name).returncode == 1
    finally:
        d = ladder("cluster", "down", "--name", name)
    assert d.returncode == 0 and "namespace lsc-lcrash-0" in d.stdout, d.stdout + d.stderr
    assert nothing_left(name, pids) == []
    again = ladder("cluster", "down", "--name", name)
    assert again.returncode == 0 and "nothing was up" in again.stdout


def test_plain_cluster_without_shaping(tmp_path):
    name = "lplain"
    launcher.down(name, log=lambda *_: None)
    p = ladder("cluster", "up", "--name", name, "--nodes", "2", "--plain", "--cpus", "1")
    try:
        assert p.returncode == 0, p.stderr[-3000:]
        st = launcher.load_state(name)
        pids = [q for n in st.nodes for q in launcher._pids_of_session(n.sid)]
        out = in_head("import ray; ray.init(); print(sorted({n['Labels'].get('ladder.io/link')"
                      " for n in ray.nodes() if n['Alive']}))", name=name)
        assert out.strip().splitlines()[-1] == "['loopback']"
        shaped = ladder("cluster", "up", "--name", "lplai2", "--plain", "--link", "cheap")
        assert shaped.returncode == 2 and "--plain cannot shape links" in shaped.stderr
    finally:
        d = ladder("cluster", "down", "--name", name)
    assert d.returncode == 0, d.stderr
    assert nothing_left(name, pids) == []


@needs_root
def test_without_rights_it_says_so_and_offers_plain():
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    env = dict(os.environ, LADDER_CLUSTER_STATE="/tmp/lsc-nobody")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", LADDER,
                        "cluster", "up", "--name", "lnone", "--nodes", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "needs root" in p.stderr and "--plain" in p.stderr
    assert launcher._leftovers("lnone") == []

"""The local multi-node launcher: real namespaces, veths, a bridge, tbf-shaped links, Ray nodes.

One 5-node cluster for the module (head and two workers on high-end links, two workers on cheap
1 Gbit/s links), driven by drivers inside the head's namespace as users run them; it comes down
at the end, and the test checks nothing of it is left (namespaces, links, state, processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cluster import launcher, network
from cluster.links import DEFAULT_MTU, Link, check_mtu, parse_link, parse_links
from ladder.links.netns import Namespaces
from ladder.procs import alive

LADDER = str(Path(sys.executable).with_name("ladder"))
NAME = "ltest"


def ladder(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([LADDER, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        def tail(b):
            return (b.decode(errors="replace") if isinstance(b, bytes) else b or "")[-4000:]
        raise AssertionError(f"`ladder {' '.join(args)}` still ran after {timeout} s:\n"
                             f"{tail(e.stdout)}\n{tail(e.stderr)}") from None


def in_head(code: str, name: str = NAME, timeout: float = 300) -> str:
    """Run a Python driver in the head's namespace, connected (`ladder cluster exec`)."""
    p = ladder("cluster", "exec", "--name", name, "--", sys.executable, "-c", code,
               timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def nothing_left(name: str, pids: list[int]) -> list[str]:
    left = network.leftovers(name)
    if launcher.state_dir(name).exists():
        left.append(str(launcher.state_dir(name)))
    left += [f"pid {p}" for p in pids if alive(p)]
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
    # the bucket holds one frame whatever the MTU (else tbf drops full frames) and no more than
    # 30 us of traffic or 4 KiB beyond it (else messages pass unshaped)
    for rate, mtu in [("cheap", 1500), ("cheap", 9000), ("100mbit", 9000), ("10gbit", 1500),
                      ("50mbit", 65535)]:
        args = parse_link(rate).tbf_args(mtu)
        burst = int(args[args.index("burst") + 1])
        assert mtu + 14 < burst <= max(4096, mtu + 64 + parse_link(rate).rate_bit // 4_000_000,
                                       parse_link(rate).rate_bit * 30 // 8_000_000), (rate, mtu)
    assert check_mtu(9000) == 9000
    for bad in (576, 70000):
        with pytest.raises(ValueError, match=f"--mtu {bad}: a link's MTU must be 1280-65535"):
            check_mtu(bad)
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
    p = ladder("cluster", "up", "--name", NAME, "--nodes", "5",
               "--link", "high-end,high-end,high-end,cheap,cheap", "--cpus", "2")
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
    assert "5 Ray nodes ready" in out
    s = json.loads(ladder("cluster", "status", "--name", NAME, "--json").stdout)
    assert s["up"] and s["ray_alive"] == 5
    assert s["ray_labels"] == ["cheap", "high-end"]
    shaping = [n["shaping"] for n in s["nodes"]]
    assert shaping == ["unshaped veth"] * 3 + ["tbf 1Gbit"] * 2
    # jumbo frames on every link, as the interfaces themselves report them, the bridge's too
    assert s["mtu"] == DEFAULT_MTU and f"links of MTU {DEFAULT_MTU}" in out
    assert [n["mtu"] for n in s["nodes"]] == [DEFAULT_MTU] * 5
    bridge = subprocess.run(["ip", "-o", "link", "show", "dev", st.bridge], capture_output=True,
                            text=True).stdout
    assert f" mtu {DEFAULT_MTU} " in bridge
    assert oct(launcher.token_path(NAME).stat().st_mode & 0o777) == "0o600"
    # a second `up` of the same name is refused, clearly, and harms nothing
    again = ladder("cluster", "up", "--name", NAME, "--nodes", "2")
    assert again.returncode == 2 and "already up" in again.stderr
    assert json.loads(ladder("cluster", "status", "--name", NAME, "--json").stdout)[
        "ray_alive"] == 5


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
        "from ladder.engine.sampling import SamplingParams\n"
        "from ladder.options import GroupOptions\n"
        "ray.init()\n"
        f"opts = GroupOptions(model={str(tiny_llama)!r}, tp=2, residual='ladder', n_slots=2,"
        " max_seq=64, threads=1)\n"
        "with TPGroup(opts, strategy='STRICT_SPREAD', link='high-end', metrics=False) as g:\n"
        "    ips = sorted(n['ip'] for n in g.nodes)\n"
        "    out = g.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))\n"
        "    print(g.info.interconnect, g.opts.comm, ','.join(ips), len(out[0]['tokens']))\n")
    line = in_head(code).strip().splitlines()[-1]
    label, comm, ips, n = line.split()
    st = shaped[0]
    assert (label, comm, n) == ("high-end", "gloo", "4")
    assert ips == f"{st.nodes[1].ip},{st.nodes[2].ip}"  # the high-end workers, not the cheap one


@needs_root
def test_local_group_across_a_shaped_veth_pair(tiny_llama):
    """A local group (no Ray) whose two ranks sit in namespaces joined by a veth pair shaped to
    the cheap profile: it all-reduces over that link (tcp), names it, decodes the same greedy
    tokens as on loopback, and the namespaces and the pair are gone afterwards."""
    from ladder.engine.local import LocalTPGroup
    from ladder.engine.sampling import SamplingParams
    from ladder.options import GroupOptions
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    opts = GroupOptions(model=str(tiny_llama), tp=2, residual="ladder", comm="tcp", n_slots=2,
                        max_seq=64, threads=1)
    with LocalTPGroup(opts) as g:
        want = g.generate([[1, 2, 3]], params)[0]["tokens"]
    tag = f"vp{os.getpid() % 10000}"
    with network.veth_pair(parse_link("cheap"), tag) as (ns, hosts):
        assert ns == (f"lsc-{tag}-0", f"lsc-{tag}-1")
        qdisc = subprocess.run(["ip", "netns", "exec", ns[0], "tc", "qdisc", "show"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "rate 1Gbit" in qdisc, qdisc
        with LocalTPGroup(replace(opts, interconnect="cheap"),
                          namespaces=Namespaces(ns, hosts)) as g:
            assert g.info.interconnect == "cheap"
            assert g.generate([[1, 2, 3]], params)[0]["tokens"] == want
    assert network.leftovers(tag) == []
    with pytest.raises(ValueError, match="one entry per rank"):
        LocalTPGroup(opts, namespaces=Namespaces(ns[:1], hosts[:1]))


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2):
    """A random 2-layer Llama with SmolLM2's tokenizer (streamed HTTP chunks carry text)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=smollm2.config.vocab_size, hidden_size=96,
                      intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=3, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_tok")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    smollm2.tokenizer().save(path)
    return path


@needs_root
def test_bench_interconnects_short_run(shaped, tiny_with_tokenizer, tmp_path):
    """`ladder bench interconnects` on the launched cluster: direct and through Serve, its
    table, JSON, Prometheus text and picture."""
    out = tmp_path / "out"
    p = ladder("bench", "interconnects", "--cluster", NAME, "--model", str(tiny_with_tokenizer),
               "--residuals", "standard,ladder", "--links", "cheap", "--batches", "2",
               "--prompt-lens", "8", "--tokens", "6", "--reps", "2", "--phase-timeout", "240",
               "--out", str(out), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ladder's overlap efficiency" in p.stdout and "speedup over standard" in p.stdout
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["mtu"] == DEFAULT_MTU and f"links of MTU {DEFAULT_MTU}" in p.stdout
    cells = {(c["path"], c["residual"]): c for c in result["cells"]}
    assert set(cells) == {("direct", "standard"), ("direct", "ladder"), ("direct", "desync"),
                          ("serve", "standard"), ("serve", "ladder")}
    for c in cells.values():
        assert c["interconnect"] == "cheap" and c["batch"] == 2
        assert c["ms_per_token"] > 0 and c["ttft_ms"] > 0 and c["tok_s"] > 0
    assert "rep 2/2" in p.stderr
    for res in ("standard", "ladder", "desync"):  # each direct figure: the median of 2 reps
        assert cells[("direct", res)]["reps"] == 2 and cells[("direct", res)]["range_ms"] >= 0
    assert cells[("direct", "desync")]["exposed_ms"] == 0
    assert cells[("direct", "standard")]["exposed_ms"] > 0
    assert [o["interconnect"] for o in result["overlap"]] == ["cheap"]
    assert {(s["path"], s["residual"]) for s in result["speedup"]} == {("direct", "ladder"),
                                                                        ("serve", "ladder")}
    assert list(out.glob("interconnects-*.json"))
    assert (out / "interconnects.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (out / "interconnects.html").read_text()
    from prometheus_client.parser import text_string_to_metric_families
    prom = {f.name: f for f in text_string_to_metric_families(
        (out / "interconnects.prom").read_text())}
    samples = prom["ladder_bench_decode_seconds_per_token"].samples
    assert {(s.labels["path"], s.labels["residual"]) for s in samples} == set(cells)
    assert all(s.labels["interconnect"] == "cheap" for s in samples)


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
        mtu = ladder("cluster", "up", "--name", "lplai2", "--plain", "--mtu", "9000")
        assert mtu.returncode == 2 and "loopback, whose MTU is its own" in mtu.stderr
        bad = ladder("cluster", "up", "--name", "lplai2", "--mtu", "100000")
        assert bad.returncode == 2 and "a link's MTU must be 1280-65535" in bad.stderr
        assert launcher.load_state("lplai2") is None and network.leftovers("lplai2") == []
    finally:
        d = ladder("cluster", "down", "--name", name)
    assert d.returncode == 0, d.stderr
    assert nothing_left(name, pids) == []


@needs_root
def test_without_rights_it_says_so_and_offers_plain():
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    env = dict(os.environ, LADDER_CLUSTER_STATE="/tmp/lsc-nobody")
    # nobody, plus only the right to read files (the checkout may sit in a 0700 folder, as a
    # `mktemp -d` clone does): no CAP_NET_ADMIN, no CAP_SYS_ADMIN
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", LADDER,
                        "cluster", "up", "--name", "lnone", "--nodes", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "needs root" in p.stderr and "--plain" in p.stderr
    assert network.leftovers("lnone") == []


def test_the_dispatcher_does_not_import_ray():
    """`ladder serve` and `ladder adapt` set RAY_AUTH_MODE before they import Ray, which reads
    it once: no subcommand's registration (this package's included) may import Ray first."""
    code = ("import sys\nfrom ladder.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@needs_root
def test_bench_linkcost_short_run(tmp_path):
    """`ladder bench linkcost`: two ranks over a veth pair per link, MTU and size; what it leaves
    is nothing."""
    p = ladder("bench", "linkcost", "--links", "high-end,cheap", "--mtus", "1500,9000",
               "--bytes", "73728", "--iters", "20", "--reps", "1", "--out", str(tmp_path),
               timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(r["link"], r["mtu"], r["bytes"]) for r in result["rows"]] == [
        ("high-end", 1500, 73728), ("high-end", 9000, 73728),
        ("cheap", 1500, 73728), ("cheap", 9000, 73728)]
    for r in result["rows"]:
        assert r["exchange_cpu_us"] == pytest.approx(r["overlapped_cpu_us"] - r["none_cpu_us"])
        if r["link"] == "cheap":
            # 72 KiB each way over 1 Gbit/s take >= 0.5 ms of wire time that compute alone does
            # not (over an unshaped veth the exchange costs ~20 us: within this machine's noise)
            assert r["standard_wall_us"] > r["none_wall_us"]
    assert list(tmp_path.glob("linkcost-*.json"))
    assert not [n for n in network._netns_list() if n.startswith("lsc-lc")]


@needs_root
def test_bench_sampling_short_run(tmp_path):
    """`ladder bench sampling`: greedy, sampled, top-p, penalized and JSON-schema decode at TP=2
    over loopback and a cheap veth pair; sampling adds a few KiB a step, never the logits;
    nothing is left."""
    p = ladder("bench", "sampling", "--links", "loopback,cheap", "--batches", "2",
               "--tokens", "3", "--reps", "1", "--out", str(tmp_path), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(r["link"], r["batch"]) for r in result["rows"]] == [("loopback", 2), ("cheap", 2)]
    assert result["skipped"] == {}
    for r in result["rows"]:
        assert set(r["ms_per_step"]) == {"greedy", "sampled", "top-p", "penalized", "json"}
        extra = r["extra_bytes_per_step"]
        # 2 rows of logits would be 2 x 49152 x 4 = 384 KiB a step
        assert extra["greedy"] == 0 and 0 < extra["sampled"] < extra["top-p"] < 8 * 1024
        assert 0 < extra["penalized"] < 8 * 1024 and r["penalized_over_sampled"] > 0
        # a grammar's masks are broadcast, not all-reduced: the draw's exchange is sampled's
        assert extra["json"] == extra["sampled"] and r["json_over_sampled"] > 0
    assert "over greedy" in p.stdout and list(tmp_path.glob("sampling-*.json"))
    assert not [n for n in network._netns_list() if n.startswith("lsc-sa")]


@pytest.mark.parametrize("args, says", [
    (["--links", "cheap@100us"], "emulated latency"),
    (["--links", "high-end,fast"], "is not a profile"),
    (["--bytes", "0"], "--bytes '0'"),
    (["--mtus", "9000,jumbo"], "--mtus '9000,jumbo': give comma-separated whole numbers"),
    (["--mtus", "900"], "1280-65535"),
])
def test_bench_linkcost_bad_arguments(args, says):
    """Bad arguments are refused before any namespace is made, with a message naming them."""
    p = ladder("bench", "linkcost", *args, timeout=120)
    assert p.returncode == 2 and says in p.stderr, p.stderr[-2000:]

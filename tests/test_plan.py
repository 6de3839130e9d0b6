"""`ladder plan`'s analytical model: the paper's published figures, the schedule's invariants,
the rows' schema, measured.json, quality curves and bad input. Pure Python: no Ray, no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ladder.model.config import ConfigError, ResidualPlan
from ladder.plan import cli, measured
from ladder.plan.costs import measured_module_seconds, module_seconds, shards
from ladder.plan.hardware import HARDWARE, THIS_CPU
from ladder.plan.links import LINKS, allreduce_seconds
from ladder.plan.models import load_model, preset_model, shape_key
from ladder.plan.step import StepOptions, play
from ladder.plan.sweep import ROW_KEYS, Setup, parse_plans, rows

REPO = Path(__file__).resolve().parents[1]
LLAMA70 = preset_model("llama-3.1-70b")
# The paper's inference code (github.com/mayank31398/ladder-residual-inference, gpt-fast):
# every rank holds the whole LM head, no token exchange. Its runs: prompt 1024, 512 new tokens.
PAPER_ENGINE = StepOptions(replicated_head=True, exchange=False)
PAPER_CONTEXT = 1024 + 256
STANDARD, LADDER, DESYNC = (ResidualPlan.parse(s, 80) for s in ("standard", "ladder", "desync"))


def setup(link: str, tp: int = 8, options: StepOptions = StepOptions(), model=LLAMA70,
          hardware: str = "h100-sxm") -> Setup:
    return Setup(config=model, tp=tp, hardware=HARDWARE[hardware], link=LINKS[link],
                 dtype="bfloat16", options=options)


def share_and_speedup(s: Setup, batch: int = 1) -> tuple[float, float]:
    std, lad = s.step(STANDARD, batch, PAPER_CONTEXT), s.step(LADDER, batch, PAPER_CONTEXT)
    return std.comm / std.seconds, std.seconds / lad.seconds


# -- the paper's figures -----------------------------------------------------------------------
# Paper: Zhang et al., "Ladder-residual: parallelism-aware architecture for accelerating large
# model inference with communication overlapping", ICML 2025, arXiv 2501.06589. The abstract
# (v4) gives the 29% end-to-end speedup for a 70B model at TP 8 (v2 said 30%). 38% is stated in
# the authors' blog post (github.com/Nanami18/Nanami18.github.io, blogs/ladder_residual/
# together_blog.md: "For a 70 model with TP degree 8, the communication can account for 38% of
# the total inference time"), whose table gives the speedup per batch (1.308 at batch 1, 1.282
# at 4). "Over 50%" with peer-to-peer disabled: we could not find the sentence in the text
# available to us; the paper's own runs (below, NCCL_P2P_DISABLE=1) give 0.53 at batch 1.
#
# The issue asks for an all-reduce share of 0.33-0.43. The paper's own published runs do not
# give that: 1 - standard / desync = 1 - 77.39 / 110.59 = 0.30 at batch 1 and 0.27 at batch 4
# (tools/plot-70b.py). 38% matches desync / standard - 1 at batch 4 (355.8 / 258.56 = 1.376), or
# the 405B runs at TP 16 (1 - 1 / 1.52..1.66 = 0.34-0.40, tools/plot-405b.py), not a 70B share.
# The model, calibrated on those runs, predicts 0.28-0.30; we hold it to the runs, 0.27-0.33.

def test_paper_70b_tp8_nvlink_share_and_speedup():
    for options in (StepOptions(), PAPER_ENGINE):  # ours (vocabulary-split head) and theirs
        share, speedup = share_and_speedup(setup("nvlink4", options=options))
        assert 0.27 <= share <= 0.33, share  # the paper's runs: 0.30 (text: 38%, see above)
        assert 1.2 <= speedup <= 1.4, speedup  # paper: 1.29x


def test_paper_70b_tp8_without_peer_to_peer_share_above_half():
    # an H100 SXM board reaches its host over PCIe 5; PCIe 4 hosts (A100 era) likewise
    for link in ("pcie5-nop2p", "pcie4-nop2p"):
        for options in (StepOptions(), PAPER_ENGINE):
            share, speedup = share_and_speedup(setup(link, options=options))
            assert share > 0.5, (link, share)  # paper: over 50%
            assert speedup > share_and_speedup(setup("nvlink4", options=options))[1]


# tools/plot-70b.py: tokens/s (all rows) at batch 1 and 4, TP 2 / 4 / 8: standard, ladder,
# desync with NCCL P2P, then standard and ladder with NCCL_P2P_DISABLE=1
PAPER_RUNS = {
    (1, 2): (35.42, 36.69, 38.24, 33.77, 36.94),
    (1, 4): (59.41, 67.51, 69.04, 53.35, 66.6),
    (1, 8): (77.39, 101.22, 110.59, 51.66, 82.59),
    (4, 2): (120.58, 126.09, 130.77, 106.6, 125.55),
    (4, 4): (185.01, 204.3, 213.73, 158.77, 204.24),
    (4, 8): (258.56, 331.45, 355.8, 173.62, 271.82),
}
RUN_CASES = ((STANDARD, "nvlink4"), (LADDER, "nvlink4"), (DESYNC, "nvlink4"),
             (STANDARD, "pcie5-nop2p"), (LADDER, "pcie5-nop2p"))


def _predicted(batch: int, tp: int) -> list[float]:
    return [batch / setup(link, tp, PAPER_ENGINE).step(plan, batch, PAPER_CONTEXT).seconds
            for plan, link in RUN_CASES]


def test_reproduces_the_papers_batch_1_runs():
    """The GPU terms were calibrated on these 15 runs (hardware.py, links.py): within 8%."""
    for tp in (2, 4, 8):
        for got, want in zip(_predicted(1, tp), PAPER_RUNS[(1, tp)]):
            assert got == pytest.approx(want, rel=0.08), (tp, got, want)


def test_ladder_speedups_at_batch_4_follow_the_papers_runs():
    """Out of sample: the speedups at batch 4 (absolute times there run 16-27% fast, see
    hardware.py), with and without P2P, within 0.08 of the runs'."""
    for tp in (2, 4, 8):
        p, m = _predicted(4, tp), PAPER_RUNS[(4, tp)]
        assert p[1] / p[0] == pytest.approx(m[1] / m[0], abs=0.08), tp
        assert p[4] / p[3] == pytest.approx(m[4] / m[3], abs=0.08), tp


# -- the schedule ----------------------------------------------------------------------------
GRID = [(a, m, r, k) for a in (5e-6, 40e-6, 300e-6) for m in (10e-6, 100e-6, 900e-6)
        for r in (0.0, 2e-6, 30e-6, 400e-6, 5e-3) for k in (0.0, 0.3, 1.0)]


@pytest.mark.parametrize("spec", ["ladder", "ladder:0-3", "ladder:2,5-7", "ladder:upper-half",
                                  "parallel"])
def test_ladder_never_slower_than_standard(spec):
    plan, standard = ResidualPlan.parse(spec, 8), ResidualPlan.parse("standard", 8)
    for a, m, r, k in GRID:
        lad, std = play(plan, 8, [a], [m], r, k), play(standard, 8, [a], [m], r, k)
        assert lad.seconds <= std.seconds + 1e-12, (spec, a, m, r, k)
        assert std.exposed == pytest.approx(std.comm)  # standard hides nothing
        if plan.kind == "ladder":
            assert lad.comm == pytest.approx(std.comm)  # same reduces, scheduled differently


def test_desync_has_no_wait_and_bounds_every_plan():
    desync = ResidualPlan.parse("desync", 8)
    for a, m, r, k in GRID:
        d = play(desync, 8, [a], [m], r, k)
        assert d.exposed == 0 and d.comm == 0
        assert d.seconds == pytest.approx(8 * (a + m))
        for spec in ("standard", "ladder", "parallel"):
            plan = ResidualPlan.parse(spec, 8)
            assert play(plan, 8, [a], [m], r, k).seconds >= d.seconds - 1e-12


def test_ladder_hides_a_reduce_behind_the_next_module():
    """The worked schedule: each reduce waits max(0, reduce - next module's compute); the last
    one is drained whole; overlap_cost charges the overlapped part to the compute."""
    a, m, r = 10e-6, 30e-6, 20e-6
    lad = play(ResidualPlan.parse("ladder", 2), 2, [a], [m], r, 0.0)
    # attn0 hidden by mlp0; mlp0's reduce waits 20-10 behind attn1; attn1's hidden by mlp1; last
    assert lad.exposed == pytest.approx((r - a) + r)
    assert lad.seconds == pytest.approx(2 * (a + m) + (r - a) + r)
    costly = play(ResidualPlan.parse("ladder", 2), 2, [a], [m], r, 0.5)
    assert costly.seconds > lad.seconds
    assert play(ResidualPlan.parse("standard", 2), 2, [a], [m], r, 0.5).seconds == \
        pytest.approx(2 * (a + m) + 4 * r)


def test_uneven_ranks_wait_for_each_other_at_every_reduce():
    """Rank 0 slow in attention, rank 1 in the MLP (SmolLM2's 3 KV heads over 2 ranks): each
    standard reduce waits for the slower rank of its module; without reduces (desync) each rank
    runs its own sum; ladder's offset waits absorb the skew (here all of it)."""
    a, m = [30e-6, 10e-6], [20e-6, 40e-6]
    std = play(ResidualPlan.parse("standard", 4), 4, a, m, 0.0, 0.0)
    des = play(ResidualPlan.parse("desync", 4), 4, a, m, 0.0, 0.0)
    lad = play(ResidualPlan.parse("ladder", 4), 4, a, m, 0.0, 0.0)
    assert std.seconds == pytest.approx(4 * (30e-6 + 40e-6))
    assert des.seconds == pytest.approx(4 * 50e-6)
    assert lad.seconds == pytest.approx(des.seconds) and lad.seconds < std.seconds


def test_partial_plan_sits_between_standard_and_ladder():
    s = setup("pcie4", tp=4, model=preset_model("llama-3.1-8b"), hardware="l4")
    times = [s.step(ResidualPlan.parse(p, 32), 8, 1024).seconds
             for p in ("standard", "ladder:16-31", "ladder")]
    assert times[0] > times[1] > times[2]


def test_allreduce_share_grows_as_the_link_slows():
    s = setup("nvlink4")
    shares = []
    for bw, lat in [(450e9, 0.0), (60e9, 1e-6), (12e9, 4e-6), (1.2e9, 15e-6), (0.12e9, 40e-6)]:
        link = dataclasses.replace(s.link, bandwidth=bw, latency_s=lat)
        shares.append(share_and_speedup(dataclasses.replace(s, link=link), batch=8)[0])
    assert shares == sorted(shares) and shares[-1] > 0.9
    ethernet = [share_and_speedup(setup(f"{g}gbe", tp=2), batch=8)[0] for g in (100, 25, 10, 1)]
    assert ethernet == sorted(ethernet)


# -- the link and compute models --------------------------------------------------------------
def test_allreduce_follows_nccl_ring_and_tree():
    nv = LINKS["nvlink4"]
    assert allreduce_seconds(nv, 1, 1e6) == 0.0
    # 8 ranks, 16 KiB over NVLink: LL ring, 6.6 us + 14 hops x 0.6 us, plus the calibrated term
    ll_ring = 6.6e-6 + 14 * 0.6e-6 + 16384 * 14 / 8 / (nv.bus_bandwidth * 0.5)
    assert allreduce_seconds(nv, 8, 16384) == pytest.approx(nv.overhead_s + ll_ring, rel=0.02)
    # large messages: bandwidth-bound, 2(p-1)/p x size over the bus bandwidth
    big = allreduce_seconds(nv, 8, 1e9)
    assert big == pytest.approx(2 * 7 / 8 * 1e9 / nv.bus_bandwidth, rel=0.02)
    # across 16 nodes, small messages: the tree's 2 log2 p hops beat the ring's 2(p-1)
    ib = LINKS["400g-ib"]
    tree = 6.8e-6 + 8 * 5.0e-6 + 2 * 64 / (ib.bus_bandwidth * 0.92 / 3.8)
    assert allreduce_seconds(ib, 16, 64) == pytest.approx(ib.overhead_s + tree, rel=1e-6)


def test_module_costs_follow_the_engines_slices():
    cfg = preset_model("llama-3.1-8b")
    hw = dataclasses.replace(HARDWARE["h100-sxm"], module_overhead_s=0.0, efficiency=1.0)
    two = shards(cfg, 2)
    mlp = module_seconds(cfg, two, "mlp", 1, 512, hw, "bfloat16")
    assert mlp == pytest.approx([3 * 14336 * 4096 * 2 / 2 / hw.mem_bw] * 2, rel=1e-3)
    # KV cache grows with context and batch; at large batch the MLP turns compute-bound
    attn = [module_seconds(cfg, two, "attention", b, c, hw, "bfloat16")[0]
            for b, c in ((1, 512), (1, 8192), (32, 8192))]
    assert attn[0] < attn[1] < attn[2]
    flops = module_seconds(cfg, two, "mlp", 4096, 512, hw, "bfloat16")[0]
    assert flops == pytest.approx(2 * 4096 * 3 * 14336 * 4096 / 2 / hw.flops16, rel=1e-3)
    # SmolLM2 at TP=2 by groups: 3 KV heads split 2 + 1 (the MLP evens the layer out); evenly:
    # 5 + 4 query heads, the middle KV head held by both
    smol = preset_model("smollm2")
    groups = module_seconds(smol, shards(smol, 2), "attention", 1, 64, hw, "float32")
    assert groups[0] == pytest.approx(2 * groups[1])
    even = module_seconds(smol, shards(smol, 2, "even"), "attention", 1, 64, hw, "float32")
    assert groups[1] < min(even) <= max(even) < groups[0]


# -- rows, the command, files ----------------------------------------------------------------
def test_rows_have_exactly_the_documented_fields():
    s = setup("pcie4", tp=2, model=preset_model("llama-3.1-8b"), hardware="l4")
    plans = parse_plans(["standard", "ladder", "upper-half", "ladder:24-31", "parallel",
                         "desync"], 32)
    out = rows(s, plans, [1, 8, 32], [512, 4096])
    assert len(out) == 6 * 3 * 2
    assert [r["plan"] for r in out[::6]] == ["standard", "ladder", "upper-half", "ladder:24-31",
                                            "parallel", "desync"]
    for r in out:
        assert tuple(r) == ROW_KEYS
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_token"], rel=1e-3)
        assert 0 <= r["allreduce_share"] < 1 and 0 <= r["hidden_share"] <= 1
    std = [r for r in out if r["plan"] == "standard"]
    des = [r for r in out if r["plan"] == "desync"]
    assert all(r["speedup"] == 1.0 and r["hidden_share"] == 0.0 for r in std)
    assert all(r["hidden_share"] == 1.0 and r["allreduce_share"] == 0.0 for r in des)


def test_tp1_has_nothing_to_hide():
    s = setup("nvlink4", tp=1, model=preset_model("llama-3.2-1b"))
    for r in rows(s, parse_plans(["standard", "ladder"], 16), [1, 8], [512]):
        assert r["speedup"] == 1.0 and r["allreduce_share"] == 0.0 and r["hidden_share"] == 0.0


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_and_table(capsys):
    args = ("--model", "llama-3.1-70b", "--tp", "8", "--hardware", "h100-sxm", "--link",
            "nvlink4", "--batch", "1,8", "--context", "512", "--plans",
            "standard,ladder,upper-half,ladder:40-49,60,parallel")
    rc, out, _ = run_cli(capsys, *args, "--json")
    data = json.loads(out)
    assert rc == 0 and [r["plan"] for r in data["rows"][::2]] == \
        ["standard", "ladder", "upper-half", "ladder:40-49,60", "parallel"]
    assert all(tuple(r) == ROW_KEYS for r in data["rows"])
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and "ms/token" in out and "ladder:40-49,60" in out


def test_cli_quality_from_an_adapt_curve(capsys, tmp_path):
    curve = {"bench": "adapt_curve", "model": "smollm2", "curves": {
        "ladder:24-29": {"points": [{"step": 0, "tokens": 0, "ppl_ratio": 1.197},
                                    {"step": 50, "tokens": 51200, "ppl_ratio": 1.031}]},
        "ladder:15-29": {"points": [{"step": 0, "tokens": 0, "ppl_ratio": 2.754}]}}}
    path = tmp_path / "adapt_curve.json"
    path.write_text("some log line\n" + json.dumps(curve) + "\n")
    rc, out, _ = run_cli(capsys, "--model", "smollm2", "--tp", "2", "--hardware", "this-cpu",
                         "--link", "tcp-cheap", "--batch", "8", "--context", "512", "--plans",
                         "standard,ladder:24-29,upper-half", "--quality", str(path), "--json")
    got = {r["plan"]: r.get("quality") for r in json.loads(out)["rows"]}
    assert got["standard"] is None
    assert got["ladder:24-29"] == {"ppl_ratio": 1.031, "train_tokens": 51200,
                                   "ppl_ratio_zero_shot": 1.197, "model": "smollm2"}
    assert got["upper-half"]["ppl_ratio"] == 2.754  # upper-half of 30 layers is 15-29


def test_cli_png(capsys, tmp_path):
    png = tmp_path / "speedup.png"
    rc, _, err = run_cli(capsys, "--model", "llama-3.1-8b", "--tp", "2", "--hardware", "l4",
                         "--link", "pcie4", "--batch", "1,8", "--png", str(png))
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in err


def test_hf_folder_and_config_json(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
           "vocab_size": 152064, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for spec in (tmp_path, tmp_path / "config.json"):
        got = load_model(str(spec))
        assert shape_key(got) == shape_key(preset_model("qwen2.5-7b"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="gpt2"):
        load_model(str(tmp_path))


def write_measured(path: Path, **sections) -> Path:
    path.write_text(json.dumps({"format": measured.FORMAT, **sections}))
    return path


def test_measured_json_replaces_the_formulas(tmp_path, monkeypatch):
    smol = preset_model("smollm2")
    key = shape_key(smol)
    compute = [{"shape": key, "tp": 2, "dtype": "float32", "module": "mlp", "batch": b,
                "context": c, "seconds": s}
               for b, c, s in ((1, 512, 1e-4), (8, 512, 2e-4), (1, 4096, 3e-4), (8, 4096, 4e-4))]
    compute += [{"shape": key, "tp": 2, "dtype": "float32", "module": "attention", "batch": b,
                 "context": 512, "seconds": 5e-5, "rank": 1} for b in (1, 8)]
    path = write_measured(tmp_path / "m.json", hardware={"name": "box", "compute": compute,
                                                         "efficiency": 0.5},
                          link={"name": "wire", "base": "tcp-cheap", "allreduce": [
                              {"ranks": 2, "bytes": 1000, "seconds": 1e-4},
                              {"ranks": 2, "bytes": 100000, "seconds": 1e-3}]})
    hw, link = measured.resolve_hardware(str(path)), measured.resolve_link(str(path))
    assert hw.name == "box" and hw.efficiency == 0.5 and hw.mem_bw == THIS_CPU.mem_bw
    two = shards(smol, 2)
    assert module_seconds(smol, two, "mlp", 8, 512, hw, "float32") == pytest.approx([2e-4] * 2)
    assert module_seconds(smol, two, "mlp", 4, 2304, hw, "float32")[0] == \
        pytest.approx((1e-4 + 3 / 7 * 1e-4 + 3e-4 + 3 / 7 * 1e-4) / 2)
    assert measured_module_seconds(hw.measured, key, 2, "float32", "mlp", 16, 512) is None
    roofline = module_seconds(smol, two, "attention", 4, 512, THIS_CPU, "float32")
    assert module_seconds(smol, two, "attention", 4, 512, hw, "float32") == \
        pytest.approx([(roofline[0] - 1e-5) * THIS_CPU.efficiency / 0.5 + 1e-5, 5e-5])
    assert link.fabric == "direct" and allreduce_seconds(link, 2, 10000) == \
        pytest.approx(5.5e-4)  # halfway in log(bytes)
    assert allreduce_seconds(link, 2, 1e6) > 1e-3  # beyond the table: the formula
    monkeypatch.setenv("LADDER_MEASURED", str(path))
    assert measured.resolve_hardware("this-cpu").name == "box"
    monkeypatch.setenv("LADDER_MEASURED", str(tmp_path / "absent.json"))
    assert measured.resolve_hardware("this-cpu") is THIS_CPU


@pytest.mark.parametrize("body, message", [
    ({"format": "other"}, "not a measured.json"),
    ({"format": measured.FORMAT}, "no \"hardware\" section"),
    ({"format": measured.FORMAT, "hardware": {"mem_bw": "fast"}}, "hardware.mem_bw"),
    ({"format": measured.FORMAT, "hardware": {"compute": [{"shape": "x"}]}}, "compute entry"),
    ({"format": measured.FORMAT, "hardware": {"efficiency": 3}}, "efficiency"),
])
def test_bad_measured_json(tmp_path, body, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=message):
        measured.resolve_hardware(str(path))


@pytest.mark.parametrize("argv, names", [
    (["--model", "llama-9"], "llama-9"),
    (["--hardware", "h300"], "h300"),
    (["--link", "warp-drive"], "warp-drive"),
    (["--plans", "standard,ladder:3-99"], "ladder:3-99"),
    (["--plans", "ladderish"], "ladderish"),
    (["--batch", "1,x"], "1,x"),
    (["--tp", "128"], "--tp 128"),
    (["--context", "999999"], "999999"),
    (["--hardware", "{tmp}/broken.json"], "broken.json"),
    (["--quality", "{tmp}/broken.json"], "broken.json"),
])
def test_bad_input_is_a_clear_error(tmp_path, argv, names):
    (tmp_path / "broken.json").write_text("{not json")
    base = {"--model": "llama-3.1-8b", "--tp": "2", "--hardware": "l4", "--link": "pcie4"}
    base.update(zip(argv[::2], argv[1::2]))
    args = [str(v).replace("{tmp}", str(tmp_path)) for kv in base.items() for v in kv]
    p = subprocess.run([sys.executable, "-m", "ladder.plan", *args], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert names.replace("{tmp}", str(tmp_path)) in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


def test_registered_as_a_ladder_command(tmp_path):
    assert 'plan = "ladder.plan.cli:register"' in (REPO / "pyproject.toml").read_text()
    # the installed metadata, read from outside the checkout (whose root may hold a stale
    # ladder_serve.egg-info from an old build)
    p = subprocess.run([sys.executable, "-c", "from importlib.metadata import entry_points; "
                        "print([e.value for e in entry_points(group='ladder.commands') "
                        "if e.name == 'plan'])"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert p.stdout.strip() == "['ladder.plan.cli:register']", "pip install -e . to register"

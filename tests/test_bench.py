"""The decode benchmark runs end to end (`--quick`) and reports well-formed figures.

No timing is asserted: this is a shared 2-core machine; the figures only have to exist, be finite
and, where they are times, rates or ratios of them, be positive.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESIDUALS = ("standard", "ladder", "parallel", "desync")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-m", "bench.decode", "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout, out


def test_quick_ends_with_one_json_line_also_written_to_out(quick):
    stdout, out = quick
    lines = stdout.strip().splitlines()
    data = json.loads(lines[-1])
    assert not any(line.startswith("{") for line in lines[:-1])
    files = list(out.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == data
    assert data["bench"] == "decode" and data["quick"] is True
    assert {"overlap", "engine_vs_hf", "bandwidth", "machine", "targets"} <= data.keys()
    # a table per part before the JSON
    for title in ("(a) Overlap", "(b) Engine vs transformers", "(c) Memory bandwidth"):
        assert title in stdout


def test_quick_overlap_figures(quick):
    o = json.loads(quick[0].strip().splitlines()[-1])["overlap"]
    c = o["condition"]
    assert positive(c["allreduce_us"]) and positive(c["attention_us"]) and positive(c["mlp_us"])
    links = o["links"]
    assert links[0]["comm"] == "gloo" and not links[0]["emulated"]
    assert links[-1]["emulated"] and links[-1]["latency_us"] > 0
    # the real slow link: tcp between two namespaces over a shaped veth pair (root only)
    shaped = [x for x in links if x.get("interconnect") == "veth 50mbit"]
    assert len(shaped) == 1 and shaped[0]["comm"] == "tcp" and not shaped[0]["emulated"]
    if os.geteuid() != 0:
        assert shaped[0]["error"].startswith("skipped: creating network namespaces needs root")
        links = [x for x in links if x is not shaped[0]]
    else:
        assert positive(shaped[0]["isolated_allreduce_us"])
        assert "on tcp (veth 50mbit, real): one all-reduce of [1, 512] (isolated)" in quick[0]
    for link in links:
        assert "error" not in link, link
        assert set(link["per_token_ms"]) == set(RESIDUALS)
        assert all(positive(link["per_token_ms"][r]) for r in RESIDUALS)
        exposed = link["exposed_ms_per_token"]
        assert exposed["desync"] == 0 and all(positive(exposed[r]) for r in ("standard", "ladder"))
        assert positive(link["ladder_speedup"]) and positive(link["parallel_speedup"])
        eff = link["overlap_efficiency"]  # may be negative in noise; null if desync was slower
        assert eff is None or math.isfinite(eff)


def test_quick_engine_and_bandwidth_figures(quick):
    data = json.loads(quick[0].strip().splitlines()[-1])
    assert data["engine_vs_hf"] and data["bandwidth"]
    for r in data["engine_vs_hf"].values():
        for k in ("ours_tok_s", "ours_wall_tok_s", "hf_tok_s", "ratio", "ratio_wall"):
            assert positive(r[k]), k
        assert 0 <= r["greedy_prefix_match"] <= r["tokens"]
    for r in data["bandwidth"].values():
        for k in ("weight_bytes_per_token", "decode_gb_s", "gemv_gb_s", "fraction"):
            assert positive(r[k]), k


def test_ladder_bench_is_a_subcommand():
    import bench.decode
    from ladder.cli import build_parser
    args = build_parser().parse_args(["bench", "decode", "--quick", "--overlap"])
    assert args.func is bench.decode.run and args.quick and args.overlap

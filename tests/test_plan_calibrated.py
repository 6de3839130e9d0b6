"""`ladder plan` calibrated on this machine and checked against the engine, a small real version
of `bench.plan_check`: a small random Llama at TP=2 (SmolLM2's full check is the bench's), a
reduced grid, shared memory and tcp over loopback, batch 1 and 8. Real processes and process
groups; no absolute time is asserted, only a generous error bound and the speedup's sign (the
median cell's: one cell's reps scatter too widely on 2 shared cores to sign it alone)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics

import pytest

from bench import plan_check
from bench.overlap_condition import Shape, write_random_llama
from ladder.model.config import ConfigError
from ladder.plan import calibrate, measured
from ladder.procs import descendants

LINKS, BATCHES = ["shm", "tcp-loopback"], [1, 8]
SHAPE = Shape(dim=512, ffn=1536, layers=8, heads=8, kv_heads=4, vocab=8192)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan") / "llama"
    write_random_llama(folder, SHAPE)
    return folder


@pytest.fixture(scope="module")
def args(model):
    return argparse.Namespace(model=str(model), dtype="float32", head_split="even",
                              prompt_len=16, tokens=16, reps=9)


@pytest.fixture(scope="module")
def calibrated(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "measured.json"
    grid = calibrate.Grid(model=str(model), tp=2, dtype="float32", splits=("even",),
                          batches=tuple(BATCHES), contexts=(16, 28), reps=3, threads=1)
    timer = functools.partial(plan_check.time_links, iters=2, modules=2 * SHAPE.layers)
    return path, calibrate.calibrate(grid, LINKS, path, timer)


def test_calibration_writes_what_the_planner_reads(calibrated):
    path, result = calibrated
    data = json.loads(path.read_text())
    assert data["format"] == measured.FORMAT and sorted(data["links"]) == sorted(LINKS)
    hw = measured.hardware_from(data, path)
    # every module, rank, batch and context of the grid, for the even split
    assert len(hw.measured) == 3 * 2 * len(BATCHES) * 2
    assert {s.split for s in hw.measured} == {"even"} and min(s.seconds for s in hw.measured) > 0
    for name in LINKS:
        link = measured.link_from(data, path, name)
        assert link.name == name and 0 <= link.overlap_cost <= 1 and link.bandwidth > 0
        assert len(data["links"][name]["timed"]) == 4  # 2 module + 2 pick sizes
    assert "link shm" in calibrate.summary(result)


def test_predictions_against_the_engine(calibrated, args):
    path, _ = calibrated
    from ladder.loaders import open_checkpoint
    before = set(descendants(os.getpid()))
    pred = plan_check.predict(path, open_checkpoint(args.model).config, args, LINKS,
                              ["standard", "ladder"], BATCHES)
    runs = plan_check.measure(args, LINKS, ["standard", "ladder"], BATCHES)
    r = plan_check.compare(pred, runs, LINKS, BATCHES)
    print(plan_check.report(r, args.reps))
    assert len(r["cells"]) == 2 * 2 * 2
    assert r["mae"] < 0.35, r["mae"]  # the bench's target is 0.15 on a quiet machine
    assert all(abs(c["error"]) < 0.7 for c in r["cells"]), r["cells"]
    # the sign: ladder faster, predicted in every cell, measured over the cells (one cell's
    # reps spread 0.65-1.7 here: its sign alone is noise, which the bench's table shows)
    assert all(s["predicted"] >= 1 for s in r["speedups"]), r["speedups"]
    assert statistics.median(s["measured"] for s in r["speedups"]) > 1, r["speedups"]
    assert set(descendants(os.getpid())) <= before  # every rank and probe ended


def test_link_timer_refuses_what_it_cannot_make():
    with pytest.raises(ConfigError, match="warp"):
        plan_check.time_links(["warp"], 2, [16], 64)
    with pytest.raises(ConfigError, match="two ranks"):
        plan_check.time_links(["shm"], 4, [16], 64)

"""`ladder plan --calibrate`: the file it writes and how the planner reads it (pure Python), then
a small real version of `bench.plan_check`: a random Llama at TP=2 calibrated on this machine
(its modules on real ranks, the shared-memory link on the engine's communicator), predicted,
and measured on local TP groups, standard and ladder, batch 1 and 8. No absolute time is
asserted: each cell's prediction and the ladder speedup within the scatter of the measured reps
(widened a little), which is tight on a quiet machine and wide on a busy one."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import statistics
from pathlib import Path

import pytest

from bench import plan_check, plan_gpu, plan_links
from bench.overlap_condition import Shape, write_random_llama
from ladder.model.config import ConfigError, ResidualPlan
from ladder.plan import calibrate, costs, measured
from ladder.plan.costs import module_seconds, shards
from ladder.plan.hardware import THIS_CPU
from ladder.plan.links import LINKS, allreduce_seconds
from ladder.plan.models import preset_model, shape_key
from ladder.plan.sweep import Setup
from ladder.procs import cmdline, descendants

STANDARD = ResidualPlan.parse("standard", 30)
LINK, BATCHES = "shm", [1, 8]
SHAPE = Shape(dim=512, ffn=1536, layers=8, heads=8, kv_heads=4, vocab=8192)


def write_measured(path: Path, **sections) -> Path:
    path.write_text(json.dumps({"format": measured.FORMAT, **sections}))
    return path


# -- the file ------------------------------------------------------------------------------------
def test_measured_links_by_name(tmp_path, monkeypatch):
    timed = [{"ranks": 2, "bytes": 16, "seconds": 2e-5}, {"ranks": 2, "bytes": 73728,
                                                          "seconds": 7e-4}]
    path = write_measured(tmp_path / "m.json", hardware={}, links={
        "tcp-cheap": {"base": "tcp-cheap", "allreduce": timed, "overlap_cost": 0.5},
        "shm": {"base": "shm", "allreduce": timed[:1]}})
    link = measured.resolve_link(f"{path}#tcp-cheap")
    assert link.name == "tcp-cheap" and link.overlap_cost == 0.5
    assert allreduce_seconds(link, 2, 73728) == pytest.approx(7e-4)
    with pytest.raises(ConfigError, match="no link 'nope'.*shm, tcp-cheap"):
        measured.resolve_link(f"{path}#nope")
    with pytest.raises(ConfigError, match="no \"link\" section"):
        measured.resolve_link(str(path))
    monkeypatch.setenv("LADDER_MEASURED", str(tmp_path / "none.json"))
    assert measured.resolve_link("tcp-cheap") is LINKS["tcp-cheap"]
    monkeypatch.setenv("LADDER_MEASURED", str(path))  # this machine's file: its CPU links
    assert measured.resolve_link("tcp-cheap").measured and \
        measured.resolve_link("tcp-high-end") is LINKS["tcp-high-end"]
    assert measured.resolve_link("nvlink4") is LINKS["nvlink4"]


def test_samples_of_the_asked_head_split():
    smol = preset_model("smollm2")
    key = shape_key(smol)
    hw = dataclasses.replace(THIS_CPU, measured=tuple(
        measured._sample({"shape": key, "tp": 2, "dtype": "float32", "module": "mlp",
                          "batch": b, "context": 64, "seconds": s, "split": split}, Path("x"))
        for split, s in (("even", 1e-4), ("groups", 3e-4)) for b in (1, 8)))
    for split, want in (("even", 1e-4), ("groups", 3e-4)):
        s = Setup(config=smol, tp=2, hardware=hw, link=LINKS["shm"], dtype="float32",
                  head_split=split)
        assert module_seconds(smol, s.specs, "mlp", 4, 64, hw, "float32", split=split) == \
            pytest.approx([want] * 2)
    assert Setup(config=smol, tp=2, hardware=hw, link=LINKS["shm"], dtype="float32").split == \
        "groups"


def _fake_ranks(grid, smol, bw: float, fixed: float) -> list[dict]:
    """What `time_compute` returns on a machine whose modules take bytes / bw + fixed s."""
    return [{"times": {(b, c): {m: fixed + costs.module_work(smol, spec, m, b, c,
                                                             "float32").bytes / bw
                                for m in measured.MODULES}
                       for b in grid.batches for c in grid.contexts},
             "overhead": {1: 1e-3 + 2e-5, 8: 1e-3 + 16e-5}, "config": smol}
            for spec in shards(smol, 2, "even")]


def test_calibration_sections_fit_and_merge(tmp_path):
    smol = preset_model("smollm2")
    grid = calibrate.Grid(model="smollm2", tp=2, dtype="float32", splits=("even",),
                          batches=(1, 8), contexts=(64, 512))
    hw_sec = calibrate.hardware_section(grid, {"even": _fake_ranks(grid, smol, 12e9, 15e-6)})
    assert hw_sec["mem_bw"] == pytest.approx(12e9, rel=1e-3)
    assert hw_sec["module_overhead_s"] == pytest.approx(15e-6, rel=1e-3)
    assert hw_sec["step_overhead_s"] == pytest.approx(1e-3) and \
        hw_sec["row_overhead_s"] == pytest.approx(2e-5)
    rows = [{"bytes": n, "seconds": 1e-5 + n / 1e9, "overlap_cost": k}
            for n, k in ((16, 1.0), (2304, 0.3), (18432, 0.5))]
    assert calibrate.message_sizes(576, grid) == [16, 128, 2304, 18432]
    link = calibrate.link_section("tcp-x", {"rows": rows, "step_overhead_s": 3e-4}, 2)
    assert link["bandwidth"] == pytest.approx(1e9) and link["latency_s"] == pytest.approx(1e-5)
    r = [1e-5 + n / 1e9 for n in (16, 2304, 18432)]  # weighted by each size's reduce time
    assert link["overlap_cost"] == pytest.approx((r[0] + 0.3 * r[1] + 0.5 * r[2]) / sum(r),
                                                 abs=1e-4)
    assert link["base"] == "tcp-high-end" and len(link["timed"]) == 3
    path = tmp_path / "m.json"
    calibrate.write(path, hw_sec, {"tcp-x": link}, {"model": "smollm2", "links": ["tcp-x"]})
    other = dict(hw_sec, compute=[dict(s, split="groups") for s in hw_sec["compute"][:3]])
    calibrate.write(path, other, {"shm": dict(link, name="shm", base="shm")})
    data = json.loads(path.read_text())
    assert sorted(data["links"]) == ["shm", "tcp-x"]
    assert [c["links"] for c in data["calibrations"]] == [["tcp-x"]]
    assert len(data["hardware"]["compute"]) == len(hw_sec["compute"]) + 3  # both splits kept
    hw = measured.hardware_from(data, path)
    s = Setup(config=smol, tp=2, hardware=hw, link=measured.link_from(data, path, "tcp-x"),
              dtype="float32", head_split="even")
    one, eight = (s.step(STANDARD, b, 64).seconds for b in (1, 8))
    assert eight > one and hw.row_overhead_s == pytest.approx(2e-5)
    no_plan = dataclasses.replace(s, link=dataclasses.replace(s.link, step_overhead_s=0.0))
    assert one - no_plan.step(STANDARD, 1, 64).seconds == pytest.approx(3e-4)


def test_a_gpu_calibration_names_its_gpu_and_falls_back_on_its_preset(tmp_path):
    """Ranks that ran on a GPU (`rank_timing`, --device cuda) report its name: the section is
    named after it and falls back on its preset's peaks (h100-sxm's for a GPU without one)."""
    smol = preset_model("smollm2")
    grid = calibrate.Grid(model="smollm2", tp=2, dtype="float32", splits=("even",),
                          batches=(1, 8), contexts=(64,), device="cuda")
    for gpu, base in (("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
                      ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("Tesla T4", "h100-sxm")):
        ranks = [dict(r, gpu=gpu) for r in _fake_ranks(grid, smol, 2e12, 2e-5)]
        sec = calibrate.hardware_section(grid, {"even": ranks})
        assert (sec["name"], sec["base"]) == (gpu, base)
    path = tmp_path / "gpu.json"
    calibrate.write(path, sec, {})
    hw = measured.resolve_hardware(str(path))
    assert hw.name == "Tesla T4" and hw.flops16 == 989e12 and hw.mem_bw == pytest.approx(2e12)


def test_a_gpu_calibration_this_machine_cannot_run_is_refused(capsys, tmp_path):
    """--device cuda: no GPU here; CPU links beside GPU ranks; a type the GPU engine lacks."""
    from ladder.plan.cli import main
    out = ["--out", str(tmp_path / "m.json"), "--model", "smollm2", "--tp", "1"]
    for extra, said in (([], "no CUDA device here"),
                        (["--calibrate-links", "shm"], "--calibrate-links ''"),
                        (["--dtype", "q4_1"], "--calibrate: ")):
        assert main(["--calibrate", "--device", "cuda", *out, *extra]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_a_grid_without_batch_1_fits_its_roofline_through_its_smallest_batch():
    """`ladder plan --calibrate --batch 8,32` failed fitting a line through no samples."""
    smol = preset_model("smollm2")
    grid = calibrate.Grid(model="smollm2", tp=2, dtype="float32", splits=("even",),
                          batches=(8, 32), contexts=(64, 512))
    ranks = [dict(r, overhead={8: 1e-3 + 16e-5, 32: 1e-3 + 64e-5})
             for r in _fake_ranks(grid, smol, 12e9, 15e-6)]
    hw_sec = calibrate.hardware_section(grid, {"even": ranks})
    assert hw_sec["mem_bw"] == pytest.approx(12e9, rel=1e-3)
    assert hw_sec["module_overhead_s"] == pytest.approx(15e-6, rel=1e-3)
    assert hw_sec["row_overhead_s"] == pytest.approx(2e-5)


def test_link_line_shrugs_off_a_wild_size():
    points = [(n, 1e-5 + n / 1e9) for n in (16, 128, 512, 2304, 18432, 73728)]
    points[4] = (18432, 1e-3)  # timed while something else ran
    fixed, per_byte = calibrate.fit_robust(points)
    assert fixed == pytest.approx(1e-5, rel=0.05) and 1 / per_byte == pytest.approx(1e9, rel=0.05)
    assert 1 / calibrate.fit_line(points)[1] < 0.7e9  # least squares: dragged off


def test_link_line_follows_the_sizes_far_apart():
    """The shm link's six sizes as one calibration timed them (us): the small sizes' pairs,
    microseconds and bytes apart, outnumber the rest; weighted by their sizes' distance the
    slope is the large sizes' (unweighted: 260 us at 73,728 bytes)."""
    timed = [(16, 23.0), (128, 25.9), (512, 38.1), (2304, 32.4), (18432, 95.1), (73728, 150.4)]
    fixed, per_byte = calibrate.fit_robust([(n, us * 1e-6) for n, us in timed])
    assert fixed + per_byte * 73728 == pytest.approx(150.4e-6, rel=0.05)
    assert fixed == pytest.approx(27e-6, rel=0.1)


def test_links_it_cannot_make_are_left_out(tmp_path):
    grid = calibrate.Grid(model="smollm2", tp=2, dtype="float32", splits=("even",),
                          batches=(1,), contexts=(64,))
    with pytest.raises(ConfigError, match="warp"):
        plan_links.time_links(["warp"], 2, [16], 64)
    with pytest.raises(ConfigError, match="two ranks"):
        plan_links.time_links(["shm"], 4, [16], 64)
    timer = functools.partial(plan_links.time_links, iters=1, modules=2)
    assert calibrate.time_links(timer, ["warp"], grid, 64) == {}


def test_step_overhead_runs_the_whole_batch_on_a_rank_engine(model):
    """12 prompts of 16 tokens: under the served default's chunk budget (24 tokens a step) the
    first end before the last is admitted and no decode step runs all 12 (which broke `ladder
    plan --calibrate` at batch 32); a calibration rank's engine admits them whole."""
    from ladder.engine.build import build_engine
    from ladder.engine.leader import Leader
    from ladder.links.base import NoComm
    from ladder.plan import rank_timing
    grid = calibrate.Grid(model=str(model), tp=1, dtype="float32", splits=("even",),
                          batches=(1, 12), contexts=(16,), threads=1)
    def scheduler_and_engine(opts):
        ckpt, engine = build_engine(opts, 0, NoComm(0, 1))
        return Leader.for_checkpoint(ckpt, engine).scheduler, engine

    opts = rank_timing.rank_options(grid, "even")
    rank = scheduler_and_engine(opts)
    assert math.isfinite(rank_timing.step_overhead(*rank, 12, reps=2))
    with pytest.raises(RuntimeError, match="all 13 rows"):  # more rows than slots
        rank_timing.step_overhead(*rank, 13, reps=1)
    served = scheduler_and_engine(dataclasses.replace(opts, max_num_batched_tokens=24))
    with pytest.raises(RuntimeError, match="all 12 rows"):
        rank_timing.step_overhead(*served, 12, reps=1)


# -- measured against the engine -----------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def ends_its_processes():
    """Every process this module starts ends with it: any left is killed by id, and fails."""
    before = set(descendants(os.getpid()))
    yield
    left = [p for p in descendants(os.getpid()) if p not in before
            and "multiprocessing.resource_tracker" not in cmdline(p)]  # the parent's, for life
    names = {p: cmdline(p) for p in left}
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"left running (now killed): {names}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan") / "llama"
    write_random_llama(folder, SHAPE)
    return folder


def _calibrate(model, path: Path):
    grid = calibrate.Grid(model=str(model), tp=2, dtype="float32", splits=("even",),
                          batches=tuple(BATCHES), contexts=(16, 28), reps=15, threads=1)
    timer = functools.partial(plan_links.time_links, iters=3, modules=3 * SHAPE.layers)
    return path, calibrate.calibrate(grid, [LINK], path, timer)


@pytest.fixture(scope="module")
def calibrated(model, tmp_path_factory):
    return _calibrate(model, tmp_path_factory.mktemp("plan") / "measured.json")


def test_calibration_writes_what_the_planner_reads(calibrated, model):
    path, result = calibrated
    data = json.loads(path.read_text())
    assert data["format"] == measured.FORMAT and list(data["links"]) == [LINK]
    assert data["calibrations"][-1]["model"] == str(model)
    assert data["calibrations"][-1]["batches"] == BATCHES
    hw = measured.hardware_from(data, path)
    # every module, rank, batch and context of the grid, for the even split
    assert len(hw.measured) == 3 * 2 * len(BATCHES) * 2
    assert {s.split for s in hw.measured} == {"even"} and min(s.seconds for s in hw.measured) > 0
    link = measured.link_from(data, path, LINK)
    assert link.name == LINK and 0 <= link.overlap_cost <= 1 and link.bandwidth > 0
    assert len(data["links"][LINK]["timed"]) == 4  # 2 module + 2 pick sizes
    assert f"link {LINK}" in calibrate.summary(result)


def _against_the_engine(path: Path, model) -> list:
    """Predicted from the calibration at `path`, then measured: what falls outside (empty when
    every cell and speedup is within its reps' scatter)."""
    from ladder.loaders import open_checkpoint
    args = argparse.Namespace(model=str(model), dtype="float32", head_split="even",
                              prompt_len=16, tokens=16, reps=7)
    residuals = ["standard", "ladder"]
    pred = plan_check.predict(path, open_checkpoint(args.model).config, args, [LINK],
                              residuals, BATCHES)
    runs, loads = plan_check.measure(args, [LINK], residuals, BATCHES)
    r = plan_check.compare(pred, runs, loads, [LINK], BATCHES)
    print(plan_check.report(r, args.reps))
    assert len(r["cells"]) == 2 * 2
    # the bench's target is 0.15 on a quiet machine. A test shares 2 cores with whatever else
    # runs (here up to 6 cores' worth of other work, which scattered one cell's reps over
    # 0.6-2.5x its median): each prediction within its cell's scatter, widened by a quarter
    out = []
    for c in r["cells"]:
        v = runs[(c["link"], c["residual"], c["batch"])]
        slack = 0.25 * statistics.median(v)
        if not min(v) - slack <= c["predicted_ms"] <= max(v) + slack:
            out.append((c, v))
    # ladder against standard (interleaved): the model's speedup within the reps' scatter
    out += [s for s in r["speedups"]
            if not s["rep_min"] - 0.1 <= s["predicted"] <= s["rep_max"] + 0.1]
    return out


def test_predictions_against_the_engine(calibrated, model, tmp_path):
    """Calibration and measurement are both timings on a shared machine: a burst of other work
    during the calibration alone skews every prediction from it (in CI, twice in four runs of
    one day, batch 8 predicted 1.35-1.48x the engine it matched within 9% on a quiet machine).
    So a miss calibrates once more and measures again; the second must hold."""
    path, _ = calibrated
    missed = _against_the_engine(path, model)
    if missed:
        print("outside on the first calibration, calibrating again:", missed)
        path, _ = _calibrate(model, tmp_path / "measured.json")
        missed = _against_the_engine(path, model)
    assert not missed, missed


def test_the_gpu_check_runs_on_the_cpu(model, tmp_path, capsys):
    """bench.plan_gpu, the device check of `--calibrate --device cuda`, end to end on this
    machine's cores (`--device cpu`): calibrated at TP=1, predicted from the file and from the
    preset, measured on a group of one rank; the file is what `ladder plan` reads."""
    args = argparse.Namespace(device="cpu", model=str(model), dtype=None, batches="1,4",
                              prompt_len=16, tokens=8, reps=3, calibrate_reps=5, threads=1,
                              out=str(tmp_path))
    assert plan_gpu.run(args) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["bench"] == "plan_gpu" and r["preset"] == "this-cpu" and r["dtype"] == "float32"
    assert [c["batch"] for c in r["cells"]] == [1, 4]
    # a ratio, not a time: the calibrated model within 2x of the engine even on a busy machine
    for c in r["cells"]:
        assert 0.5 < c["calibrated_ms"] / c["measured_ms"] < 2, c
    data = json.loads((tmp_path / "measured.json").read_text())
    assert data["calibrations"][-1]["device"] == "cpu" and data["calibrations"][-1]["tp"] == 1
    assert len(list(tmp_path.glob("plan_gpu-*.json"))) == 1

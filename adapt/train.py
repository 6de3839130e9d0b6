"""`ladder adapt` on Ray Train: data-parallel distillation with checkpoints, resume and restarts.

A `TorchTrainer` runs `train_loop` (adapt.worker) on `workers` processes (gloo on CPU, NCCL on
GPU). Each holds the whole model, takes its share of every step's rows (see `adapt.data`), and the
trainable gradients are averaged with one all-reduce per step. Every `checkpoint_every` steps rank
0 hands Ray Train the trainable tensors, the optimizer state and the step; a worker that dies is
replaced by Ray Train (`FailureConfig.max_failures`) and the group resumes from that checkpoint,
and so does a run started again after Ctrl-C: the run is named by its folder (`storage`/`name`),
whose `run.json` pins the settings that define it and whose `data.npz` the packed data, so the
resumed run continues the same data order and schedule.

Progress: the controller (on the driver's node) appends each step's rank-0 metrics to
`progress.jsonl` in the run folder; the driver prints them as they arrive (see adapt.progress).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from adapt.data import DEFAULT_DATA, Packed, prepare
from adapt.progress import ProgressPrinter, append_progress, progress_callback, read_progress
from adapt.worker import train_loop
from ladder.private import UnsafePath, check_replaceable, remove

# settings that define a run: resuming with any of them changed is refused
RUN_KEYS = ("model", "residual", "data", "steps", "batch", "seq_len", "lr", "min_lr_ratio",
            "warmup", "weight_decay", "clip", "ce_weight", "trainable", "seed", "held_out",
            "eval_rows")


class AdaptError(RuntimeError):
    """A run cannot start or resume; the message says why and what to do."""


@dataclass(kw_only=True)
class AdaptOptions:
    model: str = "smollm2"
    residual: str = "ladder:24-29"
    out: str
    data: str = str(DEFAULT_DATA)
    steps: int = 200
    batch: int = 4  # rows per step, all workers together
    seq_len: int = 256
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    warmup: int = 10  # steps of linear warm-up
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient norm clipping
    ce_weight: float = 0.0  # share of the next-token loss (the KL term gets the rest)
    trainable: str = "ladder"  # ladder: the laddered layers' parameters; all: every parameter
    seed: int = 0
    held_out: float = 0.05  # fraction of documents held out
    eval_rows: int = 16  # held-out rows scored at every evaluation
    eval_every: int = 25
    checkpoint_every: int = 25
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 3  # worker failures Ray Train recovers from
    storage: str = ""  # Ray Train's storage path; default: <out>.train
    name: str = "run"
    fresh: bool = False  # discard an earlier run of the same name instead of resuming it
    force: bool = False  # replace a non-empty --out (or --fresh's run folder) that is not ours

    def __post_init__(self) -> None:
        for f in ("steps", "batch", "workers", "eval_every", "checkpoint_every", "eval_rows"):
            if getattr(self, f) < 1:
                raise AdaptError(f"{f} must be at least 1, got {getattr(self, f)}")
        if self.batch % self.workers:
            raise AdaptError(f"--batch {self.batch} does not split over --workers "
                             f"{self.workers} (each worker takes batch / workers rows)")
        if not 0 <= self.ce_weight <= 1:
            raise AdaptError(f"--ce-weight must be in [0, 1], got {self.ce_weight}")
        if Path(self.model).exists():  # recorded as the adapted model's parent: absolute
            self.model = str(Path(self.model).resolve())
        self.out = _absolute(self.out)
        self.storage = _absolute(self.storage or self.out + ".train")

    @property
    def run_dir(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def run_settings(self) -> dict:
        return {k: getattr(self, k) for k in RUN_KEYS}


def _absolute(path: str) -> str:
    """`path` made absolute, its parent resolved but not its last part: a link given as a folder
    stays a link (which check_folders refuses) instead of leading to what it points to."""
    p = Path(os.path.abspath(path))
    return str(p.parent.resolve() / p.name)


RUN_MARKS = ("run.json", "progress.jsonl")  # prepare_run and the controller write these


def check_folders(o: AdaptOptions) -> None:
    """Refuse, before anything runs, to delete a folder this command did not write: `--out`,
    replaced by the export at the end, and with --fresh the run folder (see
    ladder.private.check_replaceable); --force allows it, except through a link."""
    from ladder.loaders.hf import EXPORT_MARK  # torch: not when the command line is parsed

    try:
        check_replaceable(Path(o.out), (EXPORT_MARK,), force=o.force, what=f"--out {o.out}")
        if o.fresh:
            check_replaceable(o.run_dir, RUN_MARKS, force=o.force,
                              what=f"the run folder {o.run_dir} (--fresh deletes it)")
    except UnsafePath as e:
        raise AdaptError(str(e)) from None


def prepare_run(o: AdaptOptions) -> Packed:
    """The run folder (new, or the one being resumed) and its packed data."""
    from ladder.loaders import open_checkpoint

    check_folders(o)
    run = o.run_dir
    if o.fresh:
        remove(run)
    ckpt = open_checkpoint(o.model)
    if ckpt.recorded_plan is not None:
        raise AdaptError(f"{ckpt.path}: already adapted to {ckpt.recorded_plan.spec(ckpt.config.n_layers)}; "
                         f"adapt its standard parent ({(ckpt.adapted or {}).get('parent')}) instead")
    plan = ckpt.plan(o.residual)
    if plan.kind != "ladder":
        raise AdaptError(f"--residual {o.residual!r}: adaptation needs a ladder plan "
                         "(e.g. ladder:24-29)")
    settings = run / "run.json"
    if settings.is_file():
        before = json.loads(settings.read_text())
        changed = {k: (before.get(k), v) for k, v in o.run_settings().items()
                   if before.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise AdaptError(f"{run} holds a run with other settings ({diff}); give the same "
                             "settings to resume it, or --fresh to start over")
        return Packed.load(run / "data.npz")
    packed = prepare(o.data, ckpt.tokenizer(), seq_len=o.seq_len,
                     max_seq_len=ckpt.config.max_seq_len, held_out=o.held_out,
                     model=str(ckpt.path))
    run.mkdir(parents=True, exist_ok=True)
    packed.save(run / "data.npz")
    settings.write_text(json.dumps(o.run_settings(), indent=2))
    return packed


def run_adapt(o: AdaptOptions, *, log=None) -> dict:
    """Train (or resume) on the connected Ray cluster, then write the adapted folder to
    `o.out`. Returns a summary; raises AdaptError when the run stopped early."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    packed = prepare_run(o)
    print(f"[adapt] {packed.describe()}", file=log, flush=True)
    done = [r["step"] for r in read_progress(o.run_dir) if "checkpoint" in r]
    if done:
        print(f"[adapt] resuming {o.run_dir} from its checkpoint at step {max(done)}",
              file=log, flush=True)
    append_progress(o.run_dir / "progress.jsonl", {"event": "start", "time": time.time()})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"options": dataclasses.asdict(o), "data": packed},
        torch_config=TorchConfig(backend="nccl" if o.gpus_per_worker else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=o.workers, use_gpu=o.gpus_per_worker > 0,
            resources_per_worker={"CPU": o.cpus_per_worker,
                                  **({"GPU": o.gpus_per_worker} if o.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=o.name, storage_path=o.storage,
            failure_config=ray.train.FailureConfig(max_failures=o.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[progress_callback(str(o.run_dir / "progress.jsonl"))]))
    t0 = time.perf_counter()
    with ProgressPrinter(o.run_dir / "progress.jsonl", o.steps, out=log):
        result = trainer.fit()
    final = result.checkpoint
    metrics = {k: v for k, v in (result.metrics or {}).items() if k != "earlier"}
    if final is None or metrics.get("step") != o.steps:
        raise AdaptError(f"the run stopped at step {metrics.get('step')} of {o.steps}; run the "
                         "same command again to resume it from its last checkpoint")
    from adapt.export import write_adapted
    with final.as_directory() as d:
        write_adapted(o, Path(d) / "state.pt", metrics)
    print(f"[adapt] wrote {o.out} ({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
    return {"out": o.out, "run": str(o.run_dir), **metrics}

"""One data-parallel worker of `ladder adapt` (Ray Train runs `train_loop` on every rank, again
after a restart): its models, its share of each step's rows, the averaged gradients, the
checkpoints it hands Ray Train and the run it resumes from them (see adapt.train)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapt.data import Packed, fingerprint, step_rows

if TYPE_CHECKING:  # annotations only: torch is imported when a worker runs, not at parse time
    import numpy as np
    import torch

    from adapt.distill import Schedule
    from adapt.train import AdaptOptions
    from ladder.model.transformer import Transformer


def train_loop(cfg: dict) -> None:
    """One data-parallel worker (Ray Train calls it on every rank, again after a restart): from
    the last checkpoint if there is one, else from step 0 after a first evaluation."""
    import ray.train

    from adapt.train import AdaptOptions  # the driver's module: it imports this one
    o = AdaptOptions(**cfg["options"])
    data: Packed = cfg["data"]
    w = _start_worker(o)
    start = _restore(w)
    held = _on_device(w, data.held_out[:o.eval_rows][w.rank::w.world])
    if start == 0:
        ray.train.report({"step": 0, "tokens": 0, "pid": os.getpid(), **_evaluate(w, held)})
    tokens_per_step = o.batch * o.seq_len
    pending: list[dict] = []  # steps done since the last report
    last_report = time.monotonic()
    for step in range(start, o.steps):
        t0 = time.perf_counter()
        rows = step_rows(step, o.batch, len(data.train), o.seed)
        x = _on_device(w, data.train[rows[w.rank::w.world]])
        done = step + 1
        metrics = {"step": done, "tokens": done * tokens_per_step, **_train_step(w, x, step),
                   "rows": fingerprint(rows), "pid": os.getpid()}
        if done % o.eval_every == 0 or done == o.steps:
            metrics.update(_evaluate(w, held))
        metrics["step_s"] = time.perf_counter() - t0
        pending.append(metrics)
        checkpoint = done % o.checkpoint_every == 0 or done == o.steps
        # every rank must make the same choice (a report is collective): the mean of their clocks
        if checkpoint or _means(w, time.monotonic() - last_report)[0] >= REPORT_EVERY_S:
            _report(w, pending, checkpoint=checkpoint)
            pending, last_report = [], time.monotonic()


# Ray Train's controller takes a worker's report when it polls (every health-check interval,
# 2 s by default) and a worker's next report waits for that: a report a step would hold short
# steps to one every 2 s (the tiny test model's 0.15 s steps ran at 2.0 s). Steps in between
# are reported together; a checkpoint is reported at once.
REPORT_EVERY_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


@dataclass(kw_only=True)
class _Worker:
    """One rank of the group: where it runs, the teacher and the student, what trains it."""

    o: AdaptOptions
    rank: int
    world: int
    device: torch.device
    teacher: Transformer
    student: Transformer
    params: list[torch.nn.Parameter]  # the student's trainable ones, in the order of `names`
    names: list[str]
    opt: torch.optim.Optimizer
    schedule: Schedule


def _start_worker(o: AdaptOptions) -> _Worker:
    """This rank's place in the group, its models on its device and a fresh optimizer."""
    import ray.train
    import torch

    from adapt.distill import Schedule, build_pair, trainable_state
    from ladder.loaders import open_checkpoint

    torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if o.gpus_per_worker else torch.device("cpu")
    ckpt = open_checkpoint(o.model)
    teacher, student = build_pair(ckpt, ckpt.plan(o.residual), o.trainable, device)
    params = [p for p in student.parameters() if p.requires_grad]
    names = list(trainable_state(student))
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(0.9, 0.95), weight_decay=o.weight_decay)
    return _Worker(o=o, rank=rank, world=world, device=device, teacher=teacher,
                   student=student, params=params, names=names, opt=opt,
                   schedule=Schedule(o.lr, o.steps, o.warmup, o.min_lr_ratio))


def _on_device(w: _Worker, rows: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(rows).long().to(w.device)


# A checkpoint is a folder: state.pt (the step, the trainable tensors by name and the optimizer
# state; adapt.export reads the tensors too) and run.json (the settings that define the run).
def _restore(w: _Worker) -> int:
    """Put Ray Train's latest checkpoint, if there is one, into the trainable parameters and
    the optimizer; the step to go on from (0 without one)."""
    import ray.train
    import torch

    restored = ray.train.get_checkpoint()
    if restored is None:
        return 0
    with restored.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location=w.device, weights_only=True)
    with torch.no_grad():
        for n, p in zip(w.names, w.params):
            p.copy_(state["params"][n])
    w.opt.load_state_dict(state["optimizer"])
    return state["step"]


def _save(w: _Worker, step: int, d: Path) -> None:
    """Write into folder `d` the checkpoint _restore reads after `step` steps."""
    import torch

    torch.save({"step": step, "params": {n: p.detach().cpu() for n, p in zip(w.names, w.params)},
                "optimizer": w.opt.state_dict()}, d / "state.pt")
    (d / "run.json").write_text(json.dumps(w.o.run_settings()))


def _report(w: _Worker, steps: list[dict], *, checkpoint: bool) -> None:
    """Hand Ray Train the metrics of `steps` (every rank does): the last step's, the earlier ones
    under "earlier"; with `checkpoint`, rank 0 a checkpoint with them too (the ranks hold the
    same state: the others report none)."""
    import ray.train

    metrics = {**steps[-1], "earlier": steps[:-1]}
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if w.rank == 0:
            _save(w, metrics["step"], Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d)
                         if w.rank == 0 else None)


def _train_step(w: _Worker, x: torch.Tensor, step: int) -> dict:
    """One optimizer step of the student on this rank's rows `x` [B, T], the gradients
    averaged over the group first; its metrics, with the loss terms averaged too."""
    import torch

    from adapt.distill import distill_loss

    for g in w.opt.param_groups:
        g["lr"] = w.schedule(step)
    with torch.no_grad():
        t_logits = w.teacher(x)
    loss, parts = distill_loss(w.student(x), t_logits, x, w.o.ce_weight)
    del t_logits
    loss.backward()
    _average_grads(w)
    grad_norm = torch.nn.utils.clip_grad_norm_(w.params, w.o.clip).item()
    w.opt.step()
    w.opt.zero_grad(set_to_none=True)
    mean_loss, kl, ce = _means(w, loss.item(), parts["kl"], parts["ce"])
    return {"loss": mean_loss, "kl": kl, "ce": ce, "lr": w.schedule(step), "grad_norm": grad_norm}


def _average_grads(w: _Worker) -> None:
    """Every trainable gradient replaced by its mean over the group: one all-reduce of them all."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([p.grad.reshape(-1) for p in w.params])
    dist.all_reduce(flat)
    flat /= w.world
    for p, g in zip(w.params, flat.split([p.numel() for p in w.params])):
        p.grad.copy_(g.view_as(p))


def _means(w: _Worker, *xs: float) -> list[float]:
    """Each of `xs` averaged over the group (one all-reduce: every rank calls it, in the same
    order)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(xs, dtype=torch.float64, device=w.device)
    dist.all_reduce(t)
    return (t / w.world).tolist()


def _evaluate(w: _Worker, held: torch.Tensor) -> dict:
    """The held-out metrics of the student against the teacher: each rank scores its rows
    `held`, one all-reduce adds up the sums (see adapt.distill.summarize)."""
    import torch.distributed as dist

    from adapt.distill import held_out_sums, summarize

    sums = held_out_sums(w.student, w.teacher, held, w.o.batch // w.world).to(w.device)
    dist.all_reduce(sums)
    return summarize(sums.cpu())

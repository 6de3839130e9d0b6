"""Distilling a ladder student from its standard parent: the models, the loss, the schedule.

Pure PyTorch around `ladder`'s own model (its full-sequence forward, autograd on): the teacher
is the checkpoint under the standard plan, frozen; the student is the same weights under the
ladder plan, with the trainable ones copied so that the teacher keeps the originals (the rest are
shared tensors, not copies). The loss is KL(teacher || student) over every position's next-token
distribution, optionally mixed with the plain next-token loss on the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ladder.loaders import Checkpoint, load_shard
from ladder.model.config import ResidualPlan
from ladder.model.tp import ShardSpec
from ladder.model.transformer import Transformer, build_model

TRAINABLE = ("ladder", "all")


def build_pair(ckpt: Checkpoint, plan: ResidualPlan, trainable: str = "ladder",
               device: torch.device | str = "cpu") -> tuple[Transformer, Transformer]:
    """(teacher, student): the whole model on one device (a data-parallel worker holds all of
    it). Only the student's trainable parameters require grad."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if plan.kind != "ladder":
        raise ValueError(f"the student's residual must be a ladder plan, got {plan.kind!r}")
    cfg = ckpt.config
    spec = ShardSpec.make(cfg, 0, 1)
    state = load_shard(ckpt, spec, torch.float32)
    teacher = build_model(cfg, spec, ResidualPlan(), state, device=device)
    train = {k for k in state if is_trainable(k, plan, trainable)}
    student = build_model(cfg, spec, plan, {k: v.clone() if k in train else v
                                            for k, v in state.items()}, device=device)
    for name, p in student.named_parameters():
        p.requires_grad_(name in train)
    return teacher, student


def is_trainable(name: str, plan: ResidualPlan, trainable: str) -> bool:
    """`ladder`: the parameters of the laddered layers (their norms included); `all`: every one."""
    if trainable == "all":
        return True
    parts = name.split(".")
    return parts[0] == "layers" and int(parts[1]) in plan.ladder_layers


def trainable_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 tokens: torch.Tensor, ce_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(loss, parts): (1 - ce_weight) * KL(teacher || student) per position
    + ce_weight * next-token cross-entropy. Logits [B, T, V], tokens [B, T]."""
    v = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, v), dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, v), dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    ce = F.nll_loss(log_s.view(*tokens.shape, v)[:, :-1].reshape(-1, v),
                    tokens[:, 1:].reshape(-1))
    loss = kl if ce_weight == 0 else (1 - ce_weight) * kl + ce_weight * ce
    return loss, {"kl": kl.item(), "ce": ce.item()}


@dataclass(frozen=True, slots=True)
class Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_ratio` at `steps`."""

    lr: float
    steps: int
    warmup: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# held-out sums, added over rows and workers: student nll, teacher nll, predicted tokens, KL,
# top-1 agreements, positions
EVAL_FIELDS = ("nll", "teacher_nll", "targets", "kl", "agree", "positions")


@torch.no_grad()
def held_out_sums(student: Transformer, teacher: Transformer, rows: torch.Tensor,
                  batch: int) -> torch.Tensor:
    """EVAL_FIELDS summed over `rows` [N, T] (long), `batch` rows at a time."""
    sums = torch.zeros(len(EVAL_FIELDS), dtype=torch.float64)
    for x in rows.split(batch) if len(rows) else ():
        s, t = student(x).float(), teacher(x).float()
        v = s.shape[-1]
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        tgt = x[:, 1:].reshape(-1)
        sums += torch.tensor([
            F.nll_loss(log_s[:, :-1].reshape(-1, v), tgt, reduction="sum").item(),
            F.nll_loss(log_t[:, :-1].reshape(-1, v), tgt, reduction="sum").item(),
            tgt.numel(),
            F.kl_div(log_s.reshape(-1, v), log_t.reshape(-1, v), log_target=True,
                     reduction="sum").item(),
            (s.argmax(-1) == t.argmax(-1)).sum().item(),
            x.numel(),
        ], dtype=torch.float64)
    return sums


def summarize(sums: torch.Tensor) -> dict[str, float]:
    """Perplexities, their ratio, KL per position and top-1 agreement from summed fields."""
    d = dict(zip(EVAL_FIELDS, sums.tolist()))
    ppl, tppl = math.exp(d["nll"] / d["targets"]), math.exp(d["teacher_nll"] / d["targets"])
    return {"ppl": ppl, "parent_ppl": tppl, "ppl_ratio": ppl / tppl,
            "held_out_kl": d["kl"] / d["positions"], "top1": d["agree"] / d["positions"]}

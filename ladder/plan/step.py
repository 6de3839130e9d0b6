"""One decode step, played out module by module as `ladder.model.transformer` schedules it.

    standard  compute module i, all-reduce it, wait for it, then module i+1
    ladder    compute module i (its input lacks module i-1's output), start its all-reduce,
              then wait for i-1's, which ran while i computed: the wait is what is left of it
    partial   ladder layers and standard layers as the plan mixes them; a standard module first
              waits for any ladder reduce still in flight
    parallel  attention and MLP of a layer side by side, one all-reduce per layer
    desync    no all-reduce at all (the speed bound; wrong outputs by design)

Each rank keeps its own clock: an all-reduce starts when the last rank has issued it (ranks'
slices can differ module by module) and the link is free: all-reduces run one at a time, in
order (one NCCL stream, one socket). While one is in flight, `overlap_cost` of the overlap
still lands on the compute (`links.Link`). Around the layers: the LM head's slice, the
vocabulary-parallel pick (each rank's best (value, id) per row, a [tp, 2, batch] float32
all-reduce; none for desync, whose model has no communicator) and the per-step overhead
(a fixed part and one per row, and the link's: the step plan's broadcast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ladder.model.config import ModelConfig, ResidualPlan
from ladder.model.tp import ShardSpec
from ladder.plan.costs import module_seconds
from ladder.plan.hardware import Hardware, act_bytes
from ladder.plan.links import Link, allreduce_seconds


@dataclass(frozen=True, slots=True)
class Played:
    """The layers of one step: wall seconds, all-reduce seconds issued, seconds rank 0 waited."""

    seconds: float
    comm: float
    exposed: float


@dataclass(frozen=True, slots=True)
class StepOptions:
    """How the engine runs a step beyond the layers. Ours: the LM head split by vocabulary and a
    small exchange to pick tokens. The paper's gpt-fast: every rank holds the whole LM head and
    computes all logits, no exchange."""

    replicated_head: bool = False
    exchange: bool = True


@dataclass(frozen=True, slots=True)
class Step:
    seconds: float
    comm: float  # all-reduce time of the step (module reduces and the token pick)
    exposed: float  # of which rank 0 waited (what the engine's metrics record)


class _Timeline:
    """Each rank's clock and one link: an all-reduce starts once the last rank has issued it
    and the link is free, and every rank waits for it where its schedule says."""

    def __init__(self, ranks: int, reduce_s: float, overlap_cost: float) -> None:
        self.reduce_s, self.overlap_cost = reduce_s, overlap_cost
        self.t = [0.0] * ranks
        self.link_free = self.comm = self.exposed = 0.0  # exposed: rank 0's waits

    def compute(self, seconds: Sequence[float]) -> None:
        for r, s in enumerate(seconds):
            in_flight = min(max(self.link_free - self.t[r], 0.0), s)
            self.t[r] += s + self.overlap_cost * in_flight

    def issue(self) -> float:
        """Start an all-reduce (after those before it on the link); when it completes."""
        self.link_free = max(*self.t, self.link_free) + self.reduce_s
        self.comm += self.reduce_s
        return self.link_free

    def wait(self, done: float) -> None:
        self.exposed += max(done - self.t[0], 0.0)
        self.t = [max(t, done) for t in self.t]


def play(plan: ResidualPlan, n_layers: int, attn_s: Sequence[float], mlp_s: Sequence[float],
         reduce_s: float, overlap_cost: float) -> Played:
    """The layers of one step under `plan`: attn_s / mlp_s are each rank's module times, each
    all-reduce takes reduce_s on the link. The step's layers end when the last rank does."""
    tl = _Timeline(len(attn_s), reduce_s, overlap_cost)
    both = [a + m for a, m in zip(attn_s, mlp_s)]
    pending: float | None = None  # completion time of the ladder reduce not yet added
    for layer in range(n_layers):
        if plan.kind in ("parallel", "desync"):
            tl.compute(both)
            if plan.kind == "parallel":
                tl.wait(tl.issue())
            continue
        ladder = plan.is_ladder(layer)
        for j, seconds in enumerate((attn_s, mlp_s)):
            if not ladder and pending is not None:
                tl.wait(pending)
                pending = None
            tl.compute(seconds)
            done = tl.issue()
            # as the engine (Transformer.hidden): the MLP before a ladder layer is in flight
            if ladder or (j == 1 and plan.is_ladder(layer + 1)):
                if pending is not None:
                    tl.wait(pending)
                pending = done
            else:
                tl.wait(done)
    if pending is not None:  # drained before the final norm
        tl.wait(pending)
    return Played(max(tl.t), tl.comm, tl.exposed)


def step(config: ModelConfig, specs: list[ShardSpec], hw: Hardware, link: Link,
         plan: ResidualPlan, batch: int, context: int, dtype: str,
         opts: StepOptions = StepOptions(), split: str | None = None) -> Step:
    """One decode step of `batch` rows at `context` cached positions over the ranks `specs`
    (their heads split by `split`, which picks the measured module times)."""
    def times(module: str) -> list[float]:
        return module_seconds(config, specs, module, batch, context, hw, dtype,
                              opts.replicated_head, split)

    tp = len(specs)
    reduce_s = allreduce_seconds(link, tp, batch * config.dim * act_bytes(dtype))
    layers = play(plan, config.n_layers, times("attention"), times("mlp"), reduce_s,
                  link.overlap_cost)
    pick = 0.0
    if opts.exchange and plan.kind != "desync":
        pick = allreduce_seconds(link, tp, 8 * tp * batch)
    total = (layers.seconds + max(times("lm_head")) + pick + hw.step_overhead_s
             + batch * hw.row_overhead_s + (link.step_overhead_s if tp > 1 else 0.0))
    return Step(total, layers.comm + pick, layers.exposed + pick)

"""A Llama-family transformer whose blocks decide where the all-reduces happen.

Reads like a single-device model: tensor parallelism is applied by loading each rank's weight
slices (see `ladder.model.tp` and `ladder.loaders`) and injecting a communicator; the model never
imports torch.distributed. After every row-parallel module (attention's `wo`, the MLP's `w2`) the
partial output is summed over the group with `comm.all_reduce`. The residual plan decides when
that sum is waited for:

    standard  h = h + wait(all_reduce(f_i(norm(h))))            # every module waits for its own
    ladder    y_i = f_i(norm(h)); start all_reduce(y_i);         # h lacks module i-1's output,
              wait(i-1); h = h + y_{i-1}                         # whose reduce overlapped f_i
    parallel  h = h + wait(all_reduce(attn(n1(h)) + mlp(n2(h))))  # one reduce per layer

A partial ladder keeps the rule at its first module too: the standard MLP before a ladder layer
leaves its reduce in flight, and the ladder attention reads the stream without it (as the
paper's own LlamaLadder models do); after the run, a standard module adds what is pending first.

The LM head is vocabulary-parallel: `logits` gives this rank's slice of the vocabulary; which
token each row takes is decided across the slices by `ladder.engine.vocab`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladder.links.base import Communicator, NoComm, Work
from ladder.model.config import ModelConfig, ResidualPlan
from ladder.model.layers import Block, RMSNorm, StepContext, attention_mask, rope_inv_freq
from ladder.model.tp import ShardSpec


class InFlight:
    """A module output whose all-reduce has started (as a ladder reduce: one that overlaps the
    next module) and has not been added to the stream yet."""

    __slots__ = ("work",)

    def __init__(self, work: Work) -> None:
        self.work = work

    def add_to(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.work.wait()


class Transformer(nn.Module):
    """One rank's shard of the model. `comm` performs the all-reduces (NoComm at TP=1)."""

    def __init__(self, config: ModelConfig, spec: ShardSpec, plan: ResidualPlan,
                 comm: Communicator | None = None) -> None:
        super().__init__()
        self.config, self.spec, self.plan = config, spec, plan
        # Embedding's own init runs even on the meta device (build_model's), where it imports
        # torch._dynamo: 1.6 s of every rank's start. Random weights only off the meta device.
        emb = torch.empty(config.vocab_size, config.dim)
        if not emb.is_meta:
            nn.init.normal_(emb)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=emb)
        self.layers = nn.ModuleList(Block(config, spec, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # this rank's vocabulary rows of the LM head as a module: an untied checkpoint's own; a
        # tied one reads the embedding's rows (until a layout step gives it a module of its own)
        self.output: nn.Module | None = None
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, spec.vocab_size, bias=False)
        # a decode step's layers as one call (set by a layout step,
        # ladder.native.layouts.NativeLayers): (h, ctx, comm) -> the stream, or None
        self.fused_layers = None
        self.set_comm(comm or NoComm())
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def set_comm(self, comm: Communicator) -> None:
        self.comm = comm
        # desync: the standard schedule with no communication (upper bound on speed)
        self.reduce = NoComm(comm.rank, comm.world_size) if self.plan.kind == "desync" else comm

    def lm_head_weight(self) -> torch.Tensor:
        """This rank's rows of the LM head [V_local, D], as the checkpoint holds them."""
        if self.output is None:
            lo, hi = self.spec.vocab
            return self.tok_embeddings.weight[lo:hi]
        return self.output.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, E/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, E]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, ctx: StepContext | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's vocabulary slice of the logits [B, T, V_local] (at TP=1 the whole
        vocabulary) for a full-sequence forward without cache (training, references).

        Use `hidden` + `logits` for cached serving steps.
        """
        return self.logits(self.hidden(tokens, ctx or self.causal_context(tokens, positions)))

    def causal_context(self, tokens: torch.Tensor,
                       positions: torch.Tensor | None = None) -> StepContext:
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        cos, sin = self.rope(positions, self.tok_embeddings.weight.dtype)
        w = self.config.sliding_window
        if w is not None and t > w:  # positions past the window: an explicit mask
            return StepContext(cos=cos, sin=sin, positions=positions,
                               mask=attention_mask(positions - positions[:, :1], t, w))
        return StepContext(cos=cos, sin=sin, positions=positions, causal=True)

    def hidden(self, tokens: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]; identical on every rank."""
        h = self.tok_embeddings(tokens)
        reduce = self.reduce
        if self.fused_layers is not None:
            out = self.fused_layers(h, ctx, reduce)
            if out is not None:
                return self.norm(out)
        pending: InFlight | None = None
        for i, layer in enumerate(self.layers):
            modules = layer.modules_in_order(ctx)
            if self.plan.kind == "parallel":
                attention, mlp = modules
                h = h + reduce.all_reduce(attention(h) + mlp(h), "module").wait()
                continue
            ladder = self.plan.is_ladder(i)
            for j, fn in enumerate(modules):
                if not ladder and pending is not None:
                    h, pending = pending.add_to(h), None
                # the MLP before a ladder layer: its attention reads the stream without it
                defer = ladder or (j == 1 and self.plan.is_ladder(i + 1))
                work = reduce.all_reduce(fn(h), "ladder" if defer else "module")
                if defer:
                    if pending is not None:
                        h = pending.add_to(h)
                    pending = InFlight(work)
                else:
                    h = h + work.wait()
        if pending is not None:  # drain before the final norm
            h = pending.add_to(h)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the logits [..., V_local]; which token a row takes is
        decided across the slices (`ladder.engine.vocab`)."""
        if self.output is None:
            return F.linear(h, self.lm_head_weight())
        return self.output(h)


def build_model(config: ModelConfig, spec: ShardSpec, plan: ResidualPlan,
                state: dict[str, torch.Tensor], comm: Communicator | None = None,
                device: torch.device | str = "cpu") -> Transformer:
    """Build on the meta device, then assign this rank's loaded weights (no copy, no init)."""
    with torch.device("meta"):
        model = Transformer(config, spec, plan, comm)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m != "inv_freq"]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.to(device).eval().requires_grad_(False)

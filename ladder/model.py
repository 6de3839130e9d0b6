"""A Llama-family transformer whose blocks decide where the all-reduces happen.

Reads like a single-device model: tensor parallelism is applied by loading each rank's weight
slices (see `ladder.tp` and `ladder.loaders`) and injecting a communicator; the model never
imports torch.distributed. After every row-parallel module (attention's `wo`, the MLP's `w2`) the
partial output is summed over the group with `comm.all_reduce`. The residual plan decides when
that sum is waited for:

    standard  h = h + wait(all_reduce(f_i(norm(h))))            # every module waits for its own
    ladder    y_i = f_i(norm(h)); start all_reduce(y_i);         # h lacks module i-1's output,
              wait(i-1); h = h + y_{i-1}                         # whose reduce overlapped f_i
    parallel  h = h + wait(all_reduce(attn(n1(h)) + mlp(n2(h))))  # one reduce per layer

Shapes: B batch rows, T tokens per row, D model dim, H / K local query / KV heads, E head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ladder.comm import Communicator, NoComm, Work
from ladder.config import ModelConfig, ResidualPlan
from ladder.tp import ShardSpec


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [E/2], with Llama-3 scaling when the config has it (as in HF)."""
    e = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, e, 2, dtype=torch.int64).float() / e))
    rs = config.rope_scaling
    if rs is None:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32, then cast back before the weight, as transformers' Llama does
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, E]; cos/sin [B, 1, T, E] (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


@dataclass(slots=True)
class StepContext:
    """What attention needs to know about this forward, beyond the hidden states.

    `positions` [B, T] are absolute token positions. With a KV cache, row b writes its keys and
    values at `positions[b]` of slot `slots[b]` and attends to everything before them in that slot;
    `kv_len` is how many cached positions the longest row needs. Without a cache (training,
    reference forwards) attention is causal within the given tokens.
    """

    cos: torch.Tensor  # [B, 1, T, E]
    sin: torch.Tensor
    positions: torch.Tensor  # [B, T]
    cache: "KVCache | None" = None
    slots: torch.Tensor | slice | None = None  # a slice when the rows sit in consecutive slots
    slot_ids: torch.Tensor | None = None  # int64 [B]: the rows' slots, whichever form `slots` has
    kv_len: int = 0
    mask: torch.Tensor | None = None  # [B, 1, T, kv_len] bool, None when causal or unmasked
    causal: bool = False


class KVCache:
    """Static slot-based cache: [layers, slots, K, max_seq, E] for keys and values.

    Allocated once, so continuous batching only moves slot indices around.
    """

    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, n_slots, n_kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots, self.max_seq = n_slots, max_seq


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: ShardSpec, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id  # its index in the KV cache
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, config.head_dim
        e = config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv) * e, bias=False)
        self.wo = nn.Linear(self.n_heads * e, config.dim, bias=False)
        # the KV head each query head reads; not j // (H / K) under the 'even' head split
        self.kv_map, self.grouped = spec.kv_map, spec.grouped
        self._kv_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Partial output [B, T, D] of this rank's heads; the caller all-reduces it."""
        b, t, _ = x.shape
        h, k_, e = self.n_heads, self.n_kv, self.head_dim
        qk, v = self.wqkv(x).split(((h + k_) * e, k_ * e), dim=-1)
        # q and k heads sit side by side in wqkv's output: one rotation for both
        q, k = apply_rope(qk.view(b, t, h + k_, e).transpose(1, 2), ctx.cos, ctx.sin).split(
            (h, k_), dim=1)
        v = v.view(b, t, k_, e).transpose(1, 2)
        if ctx.cache is not None:
            ck, cv = ctx.cache.k[self.layer_id], ctx.cache.v[self.layer_id]
            s = ctx.slots
            in_place = isinstance(s, slice)  # consecutive slots: the cache is read in place
            if in_place:
                ck, cv, s = ck[s], cv[s], slice(None)
            if in_place and t == 1 and b == 1:
                p = int(ctx.positions[0, 0])
                ck[:, :, p:p + 1] = k
                cv[:, :, p:p + 1] = v
            else:
                rows = torch.arange(b, device=x.device) if in_place else s
                idx = ctx.positions.clamp(max=ctx.cache.max_seq - 1)  # pad rows write junk late
                rr = rows[:, None].expand(b, t)
                ck[rr, :, idx] = k.transpose(1, 2)
                cv[rr, :, idx] = v.transpose(1, 2)
            # scattered slots (an index tensor): a gathered copy of the rows' first kv_len
            k, v = ck[s, :, :ctx.kv_len], cv[s, :, :ctx.kv_len]
        if not self.grouped:  # one KV head per query head, in the query heads' order
            idx = self._kv_index
            if idx is None or idx.device != k.device:
                idx = self._kv_index = torch.tensor(self.kv_map, device=k.device)
            k, v = k.index_select(1, idx), v.index_select(1, idx)
        if t == 1:
            y = _decode_attention(q, k, v, ctx.mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask,
                                               is_causal=ctx.causal and ctx.mask is None,
                                               enable_gqa=h != k.shape[1])
        return self.wo(y.transpose(1, 2).reshape(b, t, h * e))


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row: q [B, H, 1, E], k/v [B, K, L, E] -> [B, H, 1, E].

    Two small matmuls over the query heads grouped by KV head (no repeat of K/V). CPU SDPA's
    flash kernel costs ~3 ms per call at T=1, more than the layer's weights take to read.
    """
    b, h, _, e = q.shape
    kv = k.shape[1]
    dtype = q.dtype
    # float32 math: small bf16 batched matmuls have no fast CPU kernel, and the cast is cheap
    qg = q.reshape(b, kv, h // kv, e).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * (e ** -0.5)  # [B, K, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(dtype).view(b, h, 1, e)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, spec: ShardSpec) -> None:
        super().__init__()
        self.ffn = spec.ffn_size
        self.w13 = nn.Linear(config.dim, 2 * self.ffn, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(self.ffn, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.ffn, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, spec: ShardSpec, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, spec, layer_id)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, spec)

    def modules_in_order(self, ctx: StepContext):
        """The block's two residual modules as (norm, fn) pairs, attention first."""
        return ((self.attn_norm, lambda x: self.attention(x, ctx)), (self.mlp_norm, self.mlp))


class InFlight:
    """A module output whose all-reduce has started and has not been added to the stream yet.
    Its wait is accounted as a ladder wait (one that overlapped the next module)."""

    __slots__ = ("work",)

    def __init__(self, work: Work) -> None:
        self.work = work
        work.kind = "ladder"

    def add_to(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.work.wait()


class Transformer(nn.Module):
    """One rank's shard of the model. `comm` performs the all-reduces (NoComm at TP=1)."""

    def __init__(self, config: ModelConfig, spec: ShardSpec, plan: ResidualPlan,
                 comm: Communicator | None = None) -> None:
        super().__init__()
        self.config, self.spec, self.plan = config, spec, plan
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, spec, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None  # this rank's vocabulary rows of an untied LM head
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, spec.vocab_size, bias=False)
        self.head: nn.Module | None = None  # the LM head in a decode layout (ladder.kernels)
        self.set_comm(comm or NoComm())
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def set_comm(self, comm: Communicator) -> None:
        self.comm = comm
        # desync: the standard schedule with no communication (upper bound on speed)
        self._reduce = NoComm(comm.rank, comm.world_size) if self.plan.kind == "desync" else comm

    def lm_head_weight(self) -> torch.Tensor:
        """This rank's rows of the LM head [V_local, D]."""
        if self.output is not None:
            return self.output.weight
        if not self.config.tie_embeddings:
            raise RuntimeError("the untied LM head lives in `head` now (ladder.kernels)")
        lo, hi = self.spec.vocab
        return self.tok_embeddings.weight[lo:hi]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, E/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, E]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, ctx: StepContext | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for a full-sequence forward without cache (training, references).

        Use `hidden` + `logits` for cached serving steps.
        """
        return self.logits(self.hidden(tokens, ctx or self.causal_context(tokens, positions)))

    def causal_context(self, tokens: torch.Tensor,
                       positions: torch.Tensor | None = None) -> StepContext:
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        cos, sin = self.rope(positions, self.tok_embeddings.weight.dtype)
        return StepContext(cos=cos, sin=sin, positions=positions, causal=True)

    def hidden(self, tokens: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]; identical on every rank."""
        h = self.tok_embeddings(tokens)
        reduce = self._reduce
        pending: InFlight | None = None
        for i, layer in enumerate(self.layers):
            if self.plan.kind == "parallel":
                y = layer.attention(layer.attn_norm(h), ctx) + layer.mlp(layer.mlp_norm(h))
                h = h + reduce.all_reduce(y).wait()
                continue
            ladder = self.plan.is_ladder(i)
            for norm, fn in layer.modules_in_order(ctx):
                if not ladder and pending is not None:
                    h, pending = pending.add_to(h), None
                work = reduce.all_reduce(fn(norm(h)))
                if ladder:
                    if pending is not None:
                        h = pending.add_to(h)
                    pending = InFlight(work)
                else:
                    h = h + work.wait()
        if pending is not None:  # drain before the final norm
            h = pending.add_to(h)
        return self.norm(h)

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary rows of the logits [..., V_local]."""
        return self.head(h) if self.head is not None else F.linear(h, self.lm_head_weight())

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """The most likely token of each row of h [B, D]: int64 [B], the same on every rank
        (every rank must call this).

        Each rank takes the best of its vocabulary rows; one all-reduce of a [world, 2, B]
        float32 table, each rank filling its own (value, token id) row, gives every rank all the
        candidates: 8 * world * B bytes instead of the logits' V * B elements. The same token as
        argmax over the gathered logits, ties included (the first maximum: vocabulary slices
        are in rank order).
        """
        return self._best(self.local_logits(h).float())

    def _best(self, local: torch.Tensor) -> torch.Tensor:
        """Token ids [B] of the largest of `local` [B, V_local] over every rank's slice."""
        if self.spec.world == 1:
            return local.argmax(-1)
        best = local.new_zeros(self.spec.world, 2, local.shape[0])
        self._fill_best(best, local, slice(None))
        return best_over_ranks(self._gather_wait(best))

    def _fill_best(self, best: torch.Tensor, local: torch.Tensor, rows) -> None:
        """This rank's (largest value, its token id) of local[rows] into best[rank, :, rows]."""
        idx = local[rows].argmax(-1)
        best[self.spec.rank, 0, rows] = local[rows].gather(-1, idx[:, None])[:, 0]
        best[self.spec.rank, 1, rows] = (idx + self.spec.vocab[0]).float()  # exact below 2**24

    def sample(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A token per row of h [B, D] under each row's sampling (`ladder.sampling.encode_rows`:
        temperature, top_k, top_p, the step's seed; a temperature under `MIN_TEMPERATURE` is
        greedy): int64 [B] on the leader (every rank must call this; the others' result means
        nothing), without gathering the logits.

        Every sampled row draws by inverse CDF in vocabulary order (`sampling.picks`). One
        all-reduce carries, per sampled row, each rank's logsumexp of logit / temperature over
        its slice and its largest values with their ids (`CANDIDATES` of them where top-p is on,
        top_k where top-k is). A row that top-k or top-p cut is drawn by the leader from those
        candidates when every token it keeps is among them (`sampling.thresholds`); a row that
        cuts nothing is drawn in the slice of the rank its draw falls in (the slices' masses
        are in the table), which sends its token in the same (value, id) exchange that greedy
        rows use; a top-p row whose nucleus reaches below the candidates, or a top_k beyond
        `TOPK_IN_TABLE`, gathers its logits.
        Where top-p is on, the leader's reading of which rows those are is sent to all ranks (a
        [rows] all-reduce), since the branches differ in collectives.
        """
        from ladder.sampling import (CANDIDATES, MIN_TEMPERATURE, TOPK_IN_TABLE, decode_rows,
                                     picks, thresholds, uniform)
        temp, top_k, top_p, seeds = decode_rows(rows)
        local = self.local_logits(h).float()
        sampled = [i for i, t in enumerate(temp) if t >= MIN_TEMPERATURE]
        if not sampled:
            return self._best(local)
        world, rank, lead = self.spec.world, self.spec.rank, self.spec.rank == 0
        lo, hi = self.spec.vocab
        v_local = hi - lo
        dev = local.device  # the tables cross on it (NCCL's are CUDA tensors); decisions: CPU
        x = local[sampled] / torch.tensor([temp[i] for i in sampled], dtype=torch.float32,
                                          device=dev)[:, None]
        vocab = self.config.vocab_size
        ks = [k if k < vocab else 0 for k in (top_k[i] for i in sampled)]  # k >= V cuts nothing
        ps = [top_p[i] for i in sampled]
        us = [uniform(seeds[i]) for i in sampled]
        n = len(sampled)
        cut = [j for j in range(n) if ks[j] or ps[j] < 1]
        c = max(1, *(k for k in ks if k <= TOPK_IN_TABLE),
                CANDIDATES if min(ps) < 1 else 0) if cut else 1
        # per rank and sampled row: c values, their ids (rows that cut), logsumexp, whether
        # tokens stayed home
        table = x.new_zeros(world, n, 2 * c + 2)
        table[rank, :, :c] = float("-inf")
        if cut:
            top = x[cut].topk(min(c, v_local), -1)
            w = top.values.shape[1]
            table[rank, cut, :w] = top.values
            table[rank, cut, c:c + w] = (top.indices + lo).float()  # exact below 2**24
        peak = x.max(-1).values
        e = (x - peak[:, None]).exp_()  # [n, V_local]: exp(x) / exp(peak)
        table[rank, :, 2 * c] = peak + e.sum(-1).log()
        table[rank, :, 2 * c + 1] = float(v_local > c)
        if world > 1:
            table = self._gather_wait(table)
        table = table.cpu()
        lse = table[:, :, 2 * c]  # [world, n]
        log_z = torch.logsumexp(lse, 0)
        last = table[:, :, c - 1].masked_fill(table[:, :, 2 * c + 1] == 0, float("-inf"))
        bound = last.max(0).values  # every token that stayed home is at most this
        LOCAL, FROM_TABLE, WHOLE = 0, 1, 2
        modes = [LOCAL] * n
        f64 = torch.float64
        us_t = torch.tensor(us, dtype=f64)
        if cut:
            vals = table[:, cut, :c].permute(1, 0, 2).reshape(len(cut), -1)
            ids = table[:, cut, c:2 * c].permute(1, 0, 2).reshape(len(cut), -1)
            tau, ok = thresholds(vals.sort(-1, descending=True).values,
                                 torch.tensor([ks[j] for j in cut]),
                                 torch.tensor([ps[j] for j in cut], dtype=f64),
                                 log_z[cut], bound[cut])
            from_table = ok & (bound[cut].double() < tau)  # every kept token is a candidate
            for f, j in enumerate(cut):  # a top_k beyond the table: gathered, on every rank
                modes[j] = FROM_TABLE if from_table[f] and ks[j] <= TOPK_IN_TABLE else WHOLE
            if world > 1 and min(ps) < 1:  # the leader's reading decides
                agreed = x.new_zeros(n)
                if lead:
                    agreed[:] = torch.tensor(modes, dtype=torch.float32, device=dev)
                modes = [int(m) for m in self._gather_wait(agreed).tolist()]
        out = torch.zeros(local.shape[0], dtype=torch.int64)  # filled in below, on the leader
        if lead and cut:
            rows_t = [f for f, j in enumerate(cut) if modes[j] == FROM_TABLE]
            if rows_t:
                keep = vals[rows_t].double() >= tau[rows_t, None]
                got = picks(vals[rows_t].masked_fill(~keep, float("-inf")), ids[rows_t].long(),
                            us_t[[cut[f] for f in rows_t]])
                for f, t in zip(rows_t, got.tolist()):
                    out[sampled[cut[f]]] = t
        whole = [j for j in range(n) if modes[j] == WHOLE]
        if whole:
            full = x.new_zeros(len(whole), vocab)
            full[:, lo:hi] = x[whole]
            if world > 1:
                full = self._gather_wait(full)
            if lead:
                full = full.cpu()
                none = torch.full((len(whole),), float("-inf"), dtype=f64)
                tau_w, _ = thresholds(full.sort(-1, descending=True).values,
                                      torch.tensor([ks[j] for j in whole]),
                                      torch.tensor([ps[j] for j in whole], dtype=f64),
                                      torch.logsumexp(full, -1), none)
                got = picks(full.masked_fill(full.double() < tau_w[:, None], float("-inf")),
                            torch.arange(vocab).expand(len(whole), vocab), us_t[whole])
                for j, t in zip(whole, got.tolist()):
                    out[sampled[j]] = t
        drawn = [j for j in range(n) if modes[j] == LOCAL]
        greedy = [i for i, t in enumerate(temp) if t < MIN_TEMPERATURE]
        if not drawn and not greedy:
            return out
        mass = (lse.double() - log_z.double()).exp()  # [world, n]: each slice's share
        before = mass.cumsum(0) - mass
        best = local.new_zeros(world, 2, local.shape[0])
        if drawn:  # this rank's draw for each such row, were it to fall in this slice
            d = torch.tensor(drawn)
            share = (us_t[d] - before[rank, d]) / mass[rank, d].clamp_min(1e-300)
            best[rank, 1, [sampled[j] for j in drawn]] = \
                (_draw(e[d.to(dev)], share.to(dev)) + lo).float()
        if greedy:
            self._fill_best(best, local, greedy)
        if world > 1:
            best = self._gather_wait(best)
        best = best.cpu()
        if lead:
            if greedy:
                out[greedy] = best_over_ranks(best[:, :, greedy])
            for j in drawn:  # the slice the draw falls in (the last with mass, at the edge)
                ends = (before[:, j] + mass[:, j]).tolist()
                r = next((r for r in range(world) if us[j] < ends[r]),
                         max(r for r in range(world) if mass[r, j] > 0))
                out[sampled[j]] = int(best[r, 1, sampled[j]])
        return out

    def _gather_wait(self, table: torch.Tensor) -> torch.Tensor:
        """All-reduce a table that each rank fills in its own part (zeros elsewhere)."""
        work = self._reduce.all_reduce(table)
        work.kind = "gather"
        return work.wait()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits [..., V] on every rank: each computes its vocabulary rows, then one
        all-reduce of the zero-padded rows gathers them (every rank must call this)."""
        local = self.local_logits(h)
        if self.spec.world == 1:
            return local
        full = local.new_zeros(*local.shape[:-1], self.config.vocab_size)
        full[..., self.spec.vocab[0]:self.spec.vocab[1]] = local
        return self._gather_wait(full)


def _draw(e: torch.Tensor, share: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Inverse CDF per row of weights e [R, V] (float32): the first index whose cumulative
    weight exceeds share [R] (float64, in [0, 1)) of the row's total; out of range, the first or
    last index that weighs anything. Sums of `block` weights in float32, accumulated in
    float64: one pass over e, then one block."""
    r, v = e.shape
    nb = -(-v // block)
    if v % block:
        e = torch.cat([e, e.new_zeros(r, nb * block - v)], 1)
    blocks = e.view(r, nb, block)
    ends = blocks.sum(-1).double().cumsum(-1)  # [R, nb]
    target = share.clamp(min=0.0) * ends[:, -1]
    # rounding at the top edge must not land on a weightless token: at most the last that weighs
    b = torch.minimum(torch.searchsorted(ends, target[:, None], right=True)[:, 0],
                      (ends < ends[:, -1:]).sum(-1))
    prev = torch.where(b > 0, ends.gather(1, (b - 1).clamp_min(0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(r, device=e.device), b].double().cumsum(-1)  # [R, block]
    k = torch.minimum(torch.searchsorted(inner, (target - prev)[:, None], right=True)[:, 0],
                      (inner < inner[:, -1:]).sum(-1))
    return b * block + k


def best_over_ranks(best: torch.Tensor) -> torch.Tensor:
    """best [world, 2, B]: each rank's (best value, its token id) per row -> token ids [B]; of
    equal values the lowest rank's (argmax keeps the first maximum)."""
    rank = best[:, 0].argmax(0)  # [B]
    return best[:, 1].gather(0, rank[None])[0].long()


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

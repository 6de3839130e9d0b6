"""The model against Hugging Face transformers, and the ladder schedule against itself.

Tolerances: float32 logits within 1e-4 absolute of transformers' LlamaForCausalLM (the sums run
in a different order; observed differences are ~1e-6 on the tiny model), greedy tokens exactly
equal. Ladder models have no external reference: every TP size must reproduce TP=1 (1e-4), and
a hand-written two-layer recurrence must equal the model.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ladder.engine.local import LocalTPGroup  # noqa: E402
from ladder.engine.sampling import SamplingParams  # noqa: E402
from ladder.engine.step import ShardEngine, StepBatch  # noqa: E402
from ladder.links.base import NoComm  # noqa: E402
from ladder.loaders import load_shard, open_checkpoint  # noqa: E402
from ladder.model.config import ResidualPlan  # noqa: E402
from ladder.model.tp import ShardSpec  # noqa: E402
from ladder.engine.vocab import best_over_ranks  # noqa: E402
from ladder.model.transformer import build_model  # noqa: E402
from ladder.options import GroupOptions

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-layer Llama (6 heads, 3 KV heads: uneven at TP=2), saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    hf = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return path, hf


def local_model(path, residual="standard", rank=0, world=1):
    ckpt = open_checkpoint(path)
    spec = ShardSpec.make(ckpt.config, rank, world)
    plan = ResidualPlan.parse(residual, ckpt.config.n_layers)
    return build_model(ckpt.config, spec, plan, load_shard(ckpt, spec))


PROMPTS = [[5, 17, 99, 3, 42, 8, 11], [7, 7, 64, 120, 1], [33, 2, 90, 14, 15, 16, 17, 18, 19, 4]]


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False)
    return out[0, len(prompt):].tolist()


def test_tp1_matches_transformers_logits_and_greedy(tiny):
    path, hf = tiny
    model = local_model(path)
    toks = torch.tensor([PROMPTS[0] * 3])
    with torch.no_grad():
        ref = hf(toks).logits
        ours = model(toks)
    assert (ref - ours).abs().max() < ATOL
    engine = ShardEngine(model, model.comm, n_slots=2, max_seq=64)
    from ladder.engine.scheduler import Request, Scheduler
    sched = Scheduler(engine, eos_token_ids=())
    req = sched.add(Request(prompt=PROMPTS[0], params=SamplingParams(max_tokens=12,
                                                                     temperature=0)))
    while sched.has_work():
        sched.step()
    assert req.output == hf_greedy(hf, PROMPTS[0], 12)


def test_incremental_decoding_equals_full_forward(tiny):
    path, _ = tiny
    model = local_model(path, "ladder:1-2")
    toks = torch.tensor([PROMPTS[2] * 2])
    with torch.no_grad():
        full = model(toks)[0]
    engine = ShardEngine(model, model.comm, n_slots=4, max_seq=64)
    n0 = 6
    lg = engine.step(StepBatch(tokens=[toks[0, :n0].tolist()], slots=[3], starts=[0]))
    assert (lg[0] - full[n0 - 1]).abs().max() < ATOL
    for t in range(n0, toks.shape[1]):
        lg = engine.step(StepBatch(tokens=[[int(toks[0, t])]], slots=[3], starts=[t]))
        assert (lg[0] - full[t]).abs().max() < ATOL, t


def test_greedy_step_returns_the_argmax_of_the_logits(tiny):
    """A step whose rows are all greedy returns token ids: those of argmax over the logits,
    and its flags survive the broadcast encoding."""
    path, _ = tiny
    plain, greedy = (ShardEngine(local_model(path), NoComm(), n_slots=4, max_seq=64)
                     for _ in range(2))
    batch = dict(tokens=PROMPTS, slots=[2, 0, 3], starts=[0, 0, 0])
    lg = plain.step(StepBatch(**batch))
    ids = greedy.step(StepBatch(**batch, greedy=True))
    assert ids.dtype == torch.int64 and ids.tolist() == lg.float().argmax(-1).tolist()
    b = StepBatch(**batch, greedy=True)
    assert StepBatch.decode(*b.encode()) == b
    b = StepBatch(**batch, all_logits=True)
    assert StepBatch.decode(*b.encode()) == b


def test_best_over_ranks_keeps_the_first_maximum():
    """[world, 2, B] (value, token id) per rank and row: the best value wins; of equal values,
    the lowest rank's (the lower token id, as argmax over the whole vocabulary)."""
    best = torch.tensor([[[1.0, 5.0, 2.0, -3.0], [7, 8, 9, 10]],
                         [[4.0, 5.0, 1.0, -1.0], [70, 80, 90, 100]],
                         [[4.0, 2.0, 2.0, -2.0], [700, 800, 900, 1000]]])
    assert best_over_ranks(best).tolist() == [70, 8, 9, 100]


def test_padded_batch_equals_rows_alone(tiny):
    path, _ = tiny
    model = local_model(path, "ladder")
    with torch.no_grad():
        alone = [model(torch.tensor([p]))[0] for p in PROMPTS]
    engine = ShardEngine(model, model.comm, n_slots=4, max_seq=64)
    lg = engine.step(StepBatch(tokens=PROMPTS, slots=[2, 0, 3], starts=[0, 0, 0],
                               all_logits=True))
    for i, p in enumerate(PROMPTS):
        assert (lg[i, :len(p)] - alone[i]).abs().max() < ATOL


@pytest.mark.parametrize("slots", [[1, 2, 3], [4, 0, 2]], ids=["consecutive", "scattered"])
def test_batched_decode_reads_each_rows_own_slot(tiny, slots):
    """Rows in consecutive slots read the cache in place, scattered ones through a gathered
    copy: both equal each prompt's full forward at every decoded position."""
    path, _ = tiny
    model = local_model(path, "ladder:1-2")
    conts = [p + [(7 * i + j) % 128 for j in range(4)] for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        full = [model(torch.tensor([c]))[0] for c in conts]
    engine = ShardEngine(model, model.comm, n_slots=5, max_seq=64)
    engine.step(StepBatch(tokens=PROMPTS, slots=slots, starts=[0, 0, 0]))
    for j in range(4):
        pos = [len(p) + j for p in PROMPTS]
        lg = engine.step(StepBatch(tokens=[[c[n]] for c, n in zip(conts, pos)], slots=slots,
                                   starts=pos))
        for i, n in enumerate(pos):
            assert (lg[i] - full[i][n]).abs().max() < ATOL, (slots, i, j)


def test_batched_generation_equals_requests_alone(tiny):
    path, _ = tiny
    params = [SamplingParams(max_tokens=9, temperature=0),
              SamplingParams(max_tokens=5, temperature=0.8, top_k=20, seed=7),
              SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3)]
    from ladder.engine.scheduler import Request, Scheduler
    def run(pairs):
        model = local_model(path, "ladder:1-2")
        sched = Scheduler(ShardEngine(model, model.comm, n_slots=2, max_seq=64))
        reqs = [sched.add(Request(prompt=p, params=sp)) for p, sp in pairs]
        while sched.has_work():
            sched.step()
        return [r.output for r in reqs]

    together = run(list(zip(PROMPTS, params)))  # 3 requests over 2 slots: one waits for a slot
    alone = [run([(p, sp)])[0] for p, sp in zip(PROMPTS, params)]
    assert together == alone
    assert [len(t) for t in together] == [9, 5, 12]


def test_two_layer_ladder_recurrence_by_hand(tiny):
    path, _ = tiny
    model = local_model(path, "ladder:0-1")
    toks = torch.tensor([PROMPTS[0]])
    ctx = model.causal_context(toks)
    L = model.layers

    def attn(i, h):
        return L[i].attention(L[i].attn_norm(h), ctx)

    def mlp(i, h):
        return L[i].mlp(L[i].mlp_norm(h))

    with torch.no_grad():
        h0 = model.tok_embeddings(toks)
        a0 = attn(0, h0)
        m0 = mlp(0, h0)  # reads the stream without a0
        h1 = h0 + a0
        a1 = attn(1, h1)  # without m0
        h2 = h1 + m0
        m1 = mlp(1, h2)  # without a1
        h3 = h2 + a1
        # layer 2 is standard: it waits for m1 first, then adds its own outputs at once
        h4 = h3 + m1
        h5 = h4 + attn(2, h4)
        h6 = h5 + mlp(2, h5)
        ref = F.linear(model.norm(h6), model.lm_head_weight())
        assert torch.equal(ref, model(toks))
        # and it is a different model from the standard one
        std = local_model(path)(toks)
        assert (std - ref).abs().max() > 1e-3


def test_a_partial_ladder_is_the_papers_llama_ladder(tiny):
    """ladder:1-2 against the paper's LlamaLadder forward, transcribed from
    ladder-residual-inference's hf_modeling_utils: a ladder layer's attention reads the stream
    as the previous layer's attention left it (at the run's start: without the standard MLP
    before it), its MLP the stream as the previous layer's MLP left it."""
    path, _ = tiny
    model = local_model(path, "ladder:1-2")
    toks = torch.tensor([PROMPTS[2]])
    ctx = model.causal_context(toks)
    L = model.layers
    with torch.no_grad():
        h = prev_attn = model.tok_embeddings(toks)
        for i in range(3):
            if i not in (1, 2):
                a = h + L[i].attention(L[i].attn_norm(h), ctx)
                m = a + L[i].mlp(L[i].mlp_norm(a))
            else:
                a = h + L[i].attention(L[i].attn_norm(prev_attn), ctx)
                m = a + L[i].mlp(L[i].mlp_norm(h))
            h, prev_attn = m, a
        ref = F.linear(model.norm(h), model.lm_head_weight())
        assert (ref - model(toks)).abs().max() < 1e-5


def test_parallel_residual_by_hand(tiny):
    path, _ = tiny
    model = local_model(path, "parallel")
    toks = torch.tensor([PROMPTS[1]])
    ctx = model.causal_context(toks)
    with torch.no_grad():
        h = model.tok_embeddings(toks)
        for layer in model.layers:
            h = h + (layer.attention(layer.attn_norm(h), ctx) + layer.mlp(layer.mlp_norm(h)))
        assert torch.equal(F.linear(model.norm(h), model.lm_head_weight()), model(toks))


@pytest.mark.parametrize("tp,head_split", [(2, "groups"), (3, "groups"), (2, "even"),
                                           (4, "even")])
def test_tp_groups_match_transformers_and_tp1(tiny, tp, head_split):
    """Standard at TP=N equals transformers; ladder and partial ladder at TP=N equal TP=1.
    'even' at TP=2 gives each rank 3 query heads over 2 KV heads (KV head 1 on both ranks); at
    TP=4 (more ranks than KV heads) KV head 2 sits on two ranks. The even splits run standard
    and ladder only: partial ladder and parallel split heads no differently (each group start
    costs seconds on two cores)."""
    path, hf = tiny
    rows = [p * 2 for p in PROMPTS]
    expected = {}
    others = ("ladder", "ladder:1-2", "parallel") if head_split == "groups" else ("ladder",)
    with torch.no_grad():
        expected["standard"] = [hf(torch.tensor([r])).logits[0] for r in rows]
        for res in others:
            m = local_model(path, res)
            expected[res] = [m(torch.tensor([r]))[0] for r in rows]
    for res, ref in expected.items():
        with LocalTPGroup(GroupOptions(model=str(path), tp=tp, residual=res, max_seq=64,
                                       head_split=head_split)) as g:
            got = g.logits(rows)
            for a, b in zip(got, ref):
                assert (a - b).abs().max() < ATOL, res
            if res == "standard":
                out = g.generate([PROMPTS[0]], [SamplingParams(max_tokens=10, temperature=0)])
                assert out[0]["tokens"] == hf_greedy(hf, PROMPTS[0], 10)


def test_desync_runs_without_communication(tiny):
    path, _ = tiny
    with LocalTPGroup(GroupOptions(model=str(path), tp=2, residual="desync", max_seq=64)) as g:
        g.logits([PROMPTS[0]])
        tm = g.timing()
    assert tm.bytes == 0 and tm.exposed_s == 0


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=500000.0, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64})
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = local_model(tmp_path)
    assert model.config.rope_scaling is not None and model.config.tie_embeddings
    toks = torch.randint(0, 64, (1, 200))  # past the original context, where scaling matters
    with torch.no_grad():
        assert (hf(toks).logits - model(toks)).abs().max() < ATOL

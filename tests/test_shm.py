"""The shared-memory communicator against gloo, in real processes (spawned, one per rank).

Sums of integer-valued tensors are exact in every order, so they must equal gloo's bit for bit
at any TP size; random tensors must equal gloo's bit for bit at TP=2 (one addition) and within
rounding at TP=3 (gloo adds in another order), and be bit-identical on every rank. Small buffers
(4 KiB, 4 slots) make every tensor past 1024 floats span several chunks and wrap the ring.
"""

from __future__ import annotations

import glob
import os
import queue
import signal
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.engine.vocab import CANDIDATES
from ladder.links.factory import free_port, make_comm
from ladder.links.shm import SHM_DIR, CommTimeout, ShmComm
from ladder.options import GroupOptions

SIZES = [1, 7, 1024, 1025, 3 * 1024 + 5, 20_000]  # float32 elements; a slot holds 1024
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL = {"buffer_bytes": 4096, "n_slots": 4, "bcast_bytes": 256}


def segments(name: str) -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"ladder-{name}-*"))


def _entry(fn, rank, world, port, q, args):
    torch.set_num_threads(1)
    try:
        q.put(("ok", rank, fn(rank, world, port, q, *args)))
    except BaseException:
        q.put(("error", rank, traceback.format_exc()))


class Ranks:
    """`world` spawned processes running fn(rank, world, port, q, *args); always torn down."""

    def __init__(self, fn, world: int, *args) -> None:
        ctx = mp.get_context("spawn")
        self.q = ctx.Queue()
        self.port = free_port()
        self.procs = [ctx.Process(target=_entry, args=(fn, r, world, self.port, self.q, args),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def get(self, timeout: float = 60.0):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no word from the ranks within {timeout} s") from None

    def results(self, timeout: float = 120.0) -> dict:
        """Every rank's return value; a rank's exception fails the test with its traceback."""
        out, deadline = {}, time.monotonic() + timeout
        while len(out) < len(self.procs):
            kind, rank, val = self.get(max(0.1, deadline - time.monotonic()))
            if kind == "error":
                raise AssertionError(f"rank {rank} failed:\n{val}")
            out[rank] = val
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _gloo(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)


def _data(rank: int, n: int, dtype, integer: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    if integer:  # small integers: every partial sum is exact in every dtype
        return torch.randint(-20, 21, (n,), generator=g).to(dtype)
    return torch.randn(n, generator=g).to(dtype)


def compare_with_gloo(comm, rank: int, world: int, cases) -> None:
    """Per (size, dtype) case, integer and random data: two of `comm`'s all-reduces in flight
    (one non-contiguous, waited in either order) against gloo's; the ranks' random sums must
    be bit-identical across ranks."""
    mine = []  # random-data results, compared across ranks below
    for seed, (n, dtype) in enumerate(cases):
        for integer in (True, False):
            # two in flight, started before either is waited on; b is non-contiguous
            a = _data(rank, n, dtype, integer, seed)
            b = _data(rank, 3 * (n // 2 + 1), dtype, integer, seed + 1000)[::3]
            ref_a, ref_b = a.clone(), b.contiguous()
            dist.all_reduce(ref_a)
            dist.all_reduce(ref_b)
            wa, wb = comm.all_reduce(a), comm.all_reduce(b)
            if seed % 2:  # waits may come out of order: the earlier one completes first
                wa, wb = wb, wa
            wa.wait()
            wb.wait()
            exact = integer or world == 2
            for got, ref in ((a, ref_a), (b, ref_b)):
                if exact:
                    assert torch.equal(got, ref), (n, dtype, integer)
                else:
                    tol = 1e-5 if dtype == torch.float32 else 3e-2
                    assert torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol), \
                        (n, dtype, (got.float() - ref.float()).abs().max())
            if not integer and n <= 100_000:
                mine += [a.float(), b.float()]
    flat = torch.cat(mine)
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(every[0], e) for e in every), "ranks' sums differ"


def _versus_gloo(rank, world, port, q):
    _gloo(rank, world, port)
    comm = ShmComm(f"vs{port}", rank, world, cpu_group=dist.group.WORLD, **SMALL)
    try:
        compare_with_gloo(comm, rank, world, [(n, d) for n in SIZES for d in DTYPES])
        assert comm.stats.ops == 4 * len(SIZES) * len(DTYPES) and comm.stats.exposed_s > 0
        # broadcasts as the engine does them: a header, then a body past the buffer (chunks)
        for src in (0, world - 1):
            head = torch.tensor([1, 5, 77, 0]) if rank == src else torch.zeros(4, dtype=torch.int64)
            comm.broadcast(head, src)
            body = torch.arange(5 * 80) if rank == src else torch.zeros(5 * 80, dtype=torch.int64)
            comm.broadcast(body, src)
            assert head.tolist() == [1, 5, 77, 0] and torch.equal(body, torch.arange(5 * 80))
        comm.barrier()
    finally:
        comm.close()
        dist.destroy_process_group()
    return comm.stats.ops


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_equals_gloo(world):
    with Ranks(_versus_gloo, world) as ranks:
        ranks.results()
        assert segments(f"vs{ranks.port}") == []


def make_comm_ranks(rank, world, port, q, kw):
    """make_comm(GroupOptions(tp=world, **kw)) on each rank: one sum, then (label, the
    communicator's class under any emulation wrapper, its segment name if it has one)."""
    comm = make_comm(GroupOptions(tp=world, **kw), rank, f"tcp://127.0.0.1:{port}")
    try:
        x = torch.full((3,), float(rank + 1))
        comm.all_reduce(x).wait()
        assert x.tolist() == [3.0] * 3
        inner = getattr(comm, "inner", comm)
        return comm.interconnect, type(inner).__name__, getattr(inner, "name", None)
    finally:
        comm.close()
        dist.destroy_process_group()


def test_make_comm_auto_is_shm_on_cpu():
    with Ranks(make_comm_ranks, 2, {"latency_s": 1e-4}) as ranks:
        got = ranks.results()
    assert got[0][:2] == ("shm+emu100us", "ShmComm")
    assert segments(got[0][2]) == []


def _waits_on_a_lost_peer(rank, world, port, q, name):
    comm = ShmComm(name, rank, world, timeout_s=2.0, **SMALL)
    q.put(("ready", rank, os.getpid()))
    if rank == 1:
        time.sleep(60)  # killed or stalled: never publishes
        return None
    x = torch.ones(10)
    work = comm.all_reduce(x)
    t0 = time.monotonic()
    try:
        work.wait()
    except CommTimeout as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_lost_peer_raises_within_timeout(how):
    name = f"lost{how}{os.getpid()}"
    with Ranks(_waits_on_a_lost_peer, 2, name) as ranks:
        pids = {}
        while len(pids) < 2:
            kind, rank, val = ranks.get()
            assert kind == "ready", val
            pids[rank] = val
        if how == "killed":
            time.sleep(0.3)  # rank 0 is waiting by now
            os.kill(pids[1], signal.SIGKILL)
        kind, rank, val = ranks.get(timeout=10)
        assert (kind, rank) == ("ok", 0), val
        cls, msg, waited = val
        assert cls == "CommTimeout", msg
        assert "rank 1 did not publish sequence 1" in msg
        if how == "killed":
            assert "died" in msg and waited < 2.0, (msg, waited)
        else:
            assert "within 2.0 s (dead or stalled peer)" in msg and 2.0 <= waited < 3.0
    assert segments(name) == []


def _attach_then_die(rank, world, port, q, name, late):
    if rank == 1 and late:
        time.sleep(60)  # never attaches: rank 0 is killed while it waits for this rank
    ShmComm(name, rank, world, timeout_s=30.0, **SMALL)
    return "attached"


def test_crashed_group_leaves_a_segment_the_next_group_removes():
    name = f"crash{os.getpid()}"
    with Ranks(_attach_then_die, 2, name, True) as ranks:
        deadline = time.monotonic() + 60
        while not segments(name):
            assert time.monotonic() < deadline, "rank 0 never created its segment"
            time.sleep(0.05)
        ranks.procs[0].kill()
        ranks.procs[0].join()
    stale = segments(name)
    assert len(stale) == 1  # the crash happened between creation and attachment
    mine = os.path.join(SHM_DIR, f"ladder-live{os.getpid()}-{os.getpid()}")
    open(mine, "wb").close()  # a live creator's segment stays
    try:
        with Ranks(_attach_then_die, 2, name + "next", False) as ranks:
            assert ranks.results() == {0: "attached", 1: "attached"}
        assert segments(name) == [] and segments(name + "next") == []
        assert os.path.exists(mine)
    finally:
        os.unlink(mine)


@pytest.fixture(scope="module")
def greedy():
    """Greedy tokens of a partial-ladder SmolLM2 at TP=2 over each link, with the group's info,
    timing and rank 0's pid (the creator pid in its segment's name)."""
    out = {}
    for comm in ("gloo", "shm", "tcp"):
        with LocalTPGroup(GroupOptions(model="smollm2", tp=2, comm=comm,
                                       residual="ladder:24-29", max_seq=256)) as g:
            ids = g.encode("Write a short story about a robot who learns to paint.", chat=True)
            res = g.generate([ids], [SamplingParams(max_tokens=16, temperature=0)])[0]
            out[comm] = res["tokens"], g.info, g.timing(), g.procs[0].pid
    return out


def test_greedy_tokens_over_shm_equal_gloo(greedy):
    tokens, info, timing, pid = greedy["shm"]
    assert info.interconnect == "shm" and not info.emulated
    assert len(tokens) == 16 and tokens == greedy["gloo"][0]
    assert timing.bytes > 0 and timing.decode_steps == 15
    assert glob.glob(os.path.join(SHM_DIR, f"ladder-*-{pid}")) == []


def test_greedy_tokens_over_tcp_equal_gloo(greedy):
    tokens, info, timing, _ = greedy["tcp"]
    assert info.interconnect == "loopback" and not info.emulated
    assert tokens == greedy["gloo"][0] and timing.decode_steps == 15
    assert timing.bytes == greedy["gloo"][2].bytes  # the same reduces, moved another way


# top_p 0.95 at temperature 5 is nearly flat over SmolLM2's 49152 tokens: its nucleus reaches
# below each rank's CANDIDATES largest values, so that row gathers its logits instead
SAMPLED = [SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=2,
                          ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=5.0, top_p=0.95, seed=3, ignore_eos=True)]


def test_sampled_tokens_do_not_depend_on_tp_and_leave_the_logits_home():
    """Sampling on the ranks (inverse CDF in vocabulary order, the cut found from each rank's
    largest values): the same seeds give the same tokens at TP=1 and at TP=2 over tcp, a flat
    top-p row (gathered) included; rows whose cut the candidates decide move 4 KiB a step, not
    the logits (V * 4 bytes a row)."""
    prompts = ["Write a haiku about rain.", "Name three colours.", "Count to five.",
               "Say something random."]
    out = {}
    for tp, comm in ((1, "gloo"), (2, "tcp")):
        with LocalTPGroup(GroupOptions(model="smollm2", tp=tp, comm=comm, max_seq=128,
                                       n_slots=4)) as g:
            ids = [g.encode(p, chat=True) for p in prompts]
            out[tp] = [r["tokens"] for r in g.generate(ids, SAMPLED)]
            if tp == 2:  # against the same rows greedy: with and without the flat one
                greedy = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * 4
                t = {}
                for name, rows, params in (("greedy", 3, greedy), ("sampled", 3, SAMPLED),
                                           ("greedy4", 4, greedy), ("sampled4", 4, SAMPLED)):
                    g.reset_timing()
                    res = g.generate(ids[:rows], params[:rows])
                    assert [len(r["tokens"]) for r in res] == [12] * rows
                    t[name] = g.timing()
    assert out[1] == out[2], out
    assert all(len(toks) == 12 for toks in out[2])
    assert out[2][0] != out[2][2]  # sampled, not greedy
    assert t["sampled"].decode_steps == t["greedy"].decode_steps == 11
    # the same module all-reduces and (value, id) tables; besides, a step's table of the two
    # sampled rows (2 ranks x 2 rows x (CANDIDATES values and ids, logsumexp, flag) float32)
    # and the leader's reading of them (2 floats): 4 KiB, where the logits are 576 KiB
    extra = (t["sampled"].bytes - t["greedy"].bytes) / t["sampled"].steps
    assert extra == 2 * 2 * (2 * CANDIDATES + 2) * 4 + 2 * 4 < 3 * 49152 * 4 / 100
    # the flat row's nucleus reaches below the candidates: its logits cross (one row's, 192 KiB)
    extra4 = (t["sampled4"].bytes - t["greedy4"].bytes) / t["sampled4"].steps
    assert 49152 * 4 * 0.9 < extra4 < 49152 * 4 * 1.1, extra4

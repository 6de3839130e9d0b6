"""A local group's rank processes (`ladder.engine.local`): each builds its engine; rank 0 runs
the `Leader`, fed from the parent's pipe, and sends a step's events up together."""

from __future__ import annotations

import os
import threading

import torch

from ladder.engine.build import build_engine
from ladder.engine.group import GroupError
from ladder.engine.leader import Leader
from ladder.engine.scheduler import Request
from ladder.engine.step import StepBatch, StepTiming
from ladder.links.factory import close_comm, make_comm
from ladder.links.netns import Namespaces
from ladder.options import GroupOptions


def rank_main(rank: int, opts: GroupOptions, init_method: str, status, conn,
               namespaces: Namespaces | None) -> None:
    try:
        if namespaces is not None:  # first thing: only this thread moves, later ones inherit
            opts = namespaces.enter(opts, rank)
        torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // opts.tp))
        comm = make_comm(opts, rank, init_method)
        ckpt, engine = build_engine(opts, rank, comm)
        comm.barrier()
    except BaseException as e:  # report to the parent, which stops the group
        status.put(("error", rank, f"{type(e).__name__}: {e}"))
        return
    status.put(("ready", rank, None))
    try:
        if rank == 0:
            _serve(ckpt, engine, conn)
        else:
            engine.follow()
    finally:
        close_comm(comm)


def _serve(ckpt, engine, conn) -> None:
    """Rank 0: the leader, fed from the pipe; a step's events go up together."""
    lock = threading.RLock()  # one message at a time; a step's events after its acceptances
    batch: list = []

    def flush() -> None:
        with lock:
            if batch:
                conn.send(("events", batch[:]))
                batch.clear()

    def sink(rid: str):
        def put(ev) -> None:
            with lock:
                batch.append((rid, ev))
        return put

    leader = Leader.for_checkpoint(ckpt, engine, name=f"local-{os.getpid()}", after_step=flush)
    reader = threading.Thread(target=_read, args=(leader, engine, conn, lock, sink),
                              name="ladder-pipe", daemon=True)
    reader.start()
    try:
        leader.run()  # here: the thread that built the engine (see Leader.run)
    finally:
        flush()
    reader.join()  # after a failure the parent still gets its answers (GroupError) until it closes


def _read(leader: Leader, engine, conn, lock, sink) -> None:
    """The parent's messages, until it closes the pipe or goes away; then the loop stops."""
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            if msg[0] == "cancel":
                leader.cancel(msg[1])
            elif msg[0] == "submit":
                reqs = [Request(prompt=p, params=sp, id=rid) for rid, p, sp in msg[1]]
                with lock:
                    try:
                        leader.submit(reqs, [sink(r.id) for r in reqs])
                    except Exception as e:  # noqa: BLE001 - RequestError or GroupError
                        conn.send(("refused", [r.id for r in reqs], e))
                    else:
                        conn.send(("accepted", [r.id for r in reqs]))
            else:
                _answer(leader, engine, msg[1], msg[2], msg[3], conn, lock)
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        leader.stop()


def _answer(leader: Leader, engine, cid: int, name: str, args: tuple, conn, lock) -> None:
    """A call from the parent, answered with its value or its exception."""
    calls = {
        "info": leader.info, "stats": leader.stats, "encode": leader.encode,
        "encode_chat": leader.encode_chat, "decode": leader.decode,
        "ping": lambda timeout_s: leader.ping().result(timeout=timeout_s),
        "logits": lambda rows: leader.call(lambda e: _logits(e, rows)).result(),
        "timing": lambda: engine.timing,
        "reset_timing": lambda: leader.call(_reset_timing).result(),
    }
    try:
        out = ("reply", cid, calls[name](*args))
    except Exception as e:  # noqa: BLE001 - the caller's to handle
        out = ("raise", cid, e if not isinstance(e, TimeoutError)
               else GroupError(f"{name} did not finish in time"))
    with lock:
        conn.send(out)


def _logits(engine, rows: list[list[int]]) -> list[torch.Tensor]:
    out = engine.step(StepBatch(tokens=rows, slots=list(range(len(rows))),
                                starts=[0] * len(rows), all_logits=True))
    return [out[i, :len(r)].float().cpu().clone() for i, r in enumerate(rows)]


def _reset_timing(engine) -> None:
    engine.timing = StepTiming()

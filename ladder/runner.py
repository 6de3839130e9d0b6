"""Run a tensor-parallel group of local processes without Ray: the CLI's and the tests' engine.

`LocalTPGroup` spawns one process per rank (torch.distributed over gloo on 127.0.0.1, one or more
threads per rank), loads each rank's shard, and drives the leader through a pipe; the leader
drives the other ranks through the process group (see `ladder.engine`).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from ladder.comm import Communicator, EmulatedLatency, NoComm, TorchComm
from ladder.engine import ShardEngine, StepBatch, StepTiming
from ladder.kernels import fast_cpu_decode
from ladder.model import build_model
from ladder.sampling import SamplingParams
from ladder.scheduler import Request, Scheduler, TokenEvent, add_event, new_result
from ladder.tp import HEAD_SPLITS, ShardSpec

COMMS = ("auto", "gloo", "tcp", "shm", "nccl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class GroupOptions:
    model: str = "smollm2"
    tp: int = 1
    residual: str | None = None  # None: the checkpoint's own plan (an adapted one's), else standard
    dtype: str = "float32"
    comm: str = "auto"  # how ranks all-reduce: auto | gloo | tcp | shm | nccl (make_comm)
    device: str = "cpu"  # cpu | cuda (rank r uses cuda:r, NCCL all-reduces)
    cuda_index: int | None = None  # this rank's GPU when not cuda:<rank> (a Ray worker's: 0)
    n_slots: int = 8
    max_seq: int = 2048
    latency_s: float = 0.0  # emulated link latency per all-reduce (0: none)
    threads: int = 0  # torch threads per rank; 0: cores // tp
    host: str = ""  # the address this rank's gloo binds to ('' = gloo's default resolution)
    interconnect: str = ""  # the link's label when the launcher knows it better (e.g. network)
    fast_kernels: bool = True  # CPU: weights re-laid out for decode (ladder.kernels)
    head_split: str = "groups"  # groups | even: how attention heads are split (ladder.tp)
    # a local group whose ranks sit in network namespaces (`ip netns` names, one per rank), each
    # rank at its own address there (`hosts`): its links cross whatever joins the namespaces
    netns: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    op_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.comm not in COMMS:
            raise ValueError(f"comm {self.comm!r} is not one of {COMMS}")
        if (self.netns or self.hosts) and not len(self.netns) == len(self.hosts) == self.tp:
            raise ValueError(f"netns and hosts need one entry per rank (tp={self.tp}), got "
                             f"{list(self.netns)} and {list(self.hosts)}")
        if self.head_split not in HEAD_SPLITS:
            raise ValueError(f"head_split {self.head_split!r} is not one of {HEAD_SPLITS}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not one of ('cpu', 'cuda')")
        if (self.comm == "nccl") != (self.device == "cuda") and self.comm != "auto":
            raise ValueError(f"comm {self.comm!r} does not run on device {self.device!r} "
                             "(nccl is the CUDA link, the others are CPU links)")

    def cuda_device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank if self.cuda_index is None else self.cuda_index)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bind_gloo(host: str) -> str:
    """Make gloo bind to the interface that owns `host` (GLOO_SOCKET_IFNAME); returns its name.

    Left alone, gloo resolves the hostname, which may give a loopback address: a group whose
    ranks sit on different nodes then hangs at its first collective.
    """
    import fcntl
    import struct
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        if socket.inet_ntoa(raw[20:24]) == host:
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return name
    raise ValueError(f"no network interface of this node has the address {host}")


def make_comm(opts: GroupOptions, rank: int, init_method: str | None) -> Communicator:
    """The group's link. `auto`: none at TP=1, NCCL on CUDA, shared memory on CPU (a local
    group's ranks share a node). `shm` all-reduces through shared memory, with the gloo group
    initialised beside it for the rendezvous; `tcp` all-reduces over its own TCP connections,
    progressed by the ranks (no gloo threads), gloo beside it for the rest. Naming a link
    explicitly builds it even at TP=1 (a one-rank group: handy to exercise the path)."""
    if opts.tp == 1 and opts.comm == "auto":
        comm: Communicator = NoComm()
    else:
        import torch.distributed as dist
        timeout = datetime.timedelta(seconds=opts.op_timeout_s)
        if opts.host:
            bind_gloo(opts.host)
        if opts.device == "cuda":
            dev = opts.cuda_device(rank)
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", init_method=init_method, rank=rank,
                                    world_size=opts.tp, timeout=timeout, device_id=dev)
            cpu_group = dist.new_group(backend="gloo", timeout=timeout)
            # a label the launch knows (the launcher's link, `network` across nodes) wins
            comm = TorchComm(cpu_group=cpu_group, interconnect=opts.interconnect
                             or cuda_interconnect(cpu_group, dev))
        else:
            dist.init_process_group("gloo", init_method=init_method, rank=rank,
                                    world_size=opts.tp, timeout=timeout)
            if opts.comm == "gloo":
                comm = TorchComm(interconnect=opts.interconnect or "loopback")
            elif opts.comm == "tcp":
                from ladder.tcp import TcpComm
                comm = TcpComm(rank, opts.tp, opts.host or "127.0.0.1",
                               cpu_group=dist.group.WORLD,
                               interconnect=opts.interconnect or "loopback",
                               timeout_s=opts.op_timeout_s)
            else:
                from ladder.shm import ShmComm
                # the segment's path adds rank 0's pid (told through gloo): the name only
                # makes /dev/shm readable, its port part need not be unique
                port = (init_method or os.environ.get("MASTER_PORT", "0")).rsplit(":", 1)[-1]
                name = "p" + "".join(c if c.isalnum() else "_" for c in port)
                comm = ShmComm(name, rank, opts.tp, cpu_group=dist.group.WORLD,
                               timeout_s=opts.op_timeout_s)
    return EmulatedLatency(comm, opts.latency_s) if opts.latency_s > 0 else comm


def cuda_interconnect(cpu_group, device: torch.device) -> str:
    """The link between this group's GPUs, from NVML: `nvlink` when every pair of them has
    NVLink, `pcie` when some pair has not, `network` when the ranks are on different hosts.

    Each rank tells the others (through the gloo group) its host and its GPU's UUID; NVML is
    asked by UUID, since NVML numbers every GPU of the host while a Ray worker sees one GPU as
    cuda:0 (CUDA_VISIBLE_DEVICES), so indices would name the wrong devices.
    """
    import torch.distributed as dist
    me = (socket.gethostname(), "GPU-" + str(torch.cuda.get_device_properties(device).uuid))
    everyone: list = [None] * dist.get_world_size(cpu_group)
    dist.all_gather_object(everyone, me, group=cpu_group)
    return gpu_link(everyone, _nvml_nvlink)


def gpu_link(ranks: list[tuple[str, str]], nvlink) -> str:
    """`ranks`: (host, GPU UUID) per rank; `nvlink(uuid_a, uuid_b)` -> bool, or raises when
    NVML cannot tell."""
    if len(ranks) == 1:
        return "none"
    if len({host for host, _ in ranks}) > 1:
        return "network"
    uuids = [u for _, u in ranks]
    try:
        ok = all(nvlink(uuids[i], uuids[j])
                 for i in range(len(uuids)) for j in range(i + 1, len(uuids)))
    except Exception:  # no NVML here: P2P unknown, the conservative label
        return "pcie"
    return "nvlink" if ok else "pcie"


def _nvml_nvlink(a: str, b: str) -> bool:
    import pynvml
    pynvml.nvmlInit()
    ha, hb = (pynvml.nvmlDeviceGetHandleByUUID(u.encode()) for u in (a, b))
    return pynvml.nvmlDeviceGetP2PStatus(ha, hb, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) == \
        pynvml.NVML_P2P_STATUS_OK


def build_engine(opts: GroupOptions, rank: int, comm: Communicator):
    """Load this rank's shard and wrap it in an engine; returns (checkpoint, engine)."""
    from ladder.loaders import load_shard, open_checkpoint
    ckpt = open_checkpoint(opts.model)
    cfg = ckpt.config
    spec = ShardSpec.make(cfg, rank, opts.tp, opts.head_split)
    plan = ckpt.plan(opts.residual)
    state = load_shard(ckpt, spec, DTYPES[opts.dtype])
    device = opts.cuda_device(rank) if opts.device == "cuda" else torch.device("cpu")
    model = build_model(cfg, spec, plan, state, comm, device=device)
    if opts.fast_kernels and device.type == "cpu":
        fast_cpu_decode(model)
    engine = ShardEngine(model, comm, n_slots=opts.n_slots,
                         max_seq=min(opts.max_seq, cfg.max_seq_len))
    return ckpt, engine


class Leader:
    """Rank 0's side: a scheduler over the engine, answering the parent's commands."""

    def __init__(self, ckpt, engine: ShardEngine) -> None:
        from ladder.tokenizer import TokenizerError
        self.engine = engine
        self.adapted = ckpt.adapted is not None
        try:
            self.tokenizer = ckpt.tokenizer()
        except TokenizerError:  # a bare checkpoint still serves token ids
            self.tokenizer = None
        eos = set(ckpt.config.eos_token_ids)
        if self.tokenizer is not None:
            eos.update(self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(
            engine, eos_token_ids=tuple(sorted(eos)),
            decoder_factory=self.tokenizer.incremental_decoder if self.tokenizer else None)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]
                 ) -> Iterator[TokenEvent]:
        for events in self.generate_steps(prompts, params):
            yield from events

    def generate_steps(self, prompts: list[list[int]], params: list[SamplingParams]
                       ) -> Iterator[list[TokenEvent]]:
        """The events of each engine step together (one per running request)."""
        for i, (p, sp) in enumerate(zip(prompts, params)):
            self.scheduler.add(Request(prompt=list(p), params=sp, id=i))
        while self.scheduler.has_work():
            yield self.scheduler.step()

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            return self.encode_chat([{"role": "user", "content": text}])
        return self._tokenizer().encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation through the model's chat template."""
        return self._tokenizer().apply_chat_template(messages)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids")
        return self.tokenizer

    def logits(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Full-sequence logits per row through the cached path (slots 0..B-1, positions 0..)."""
        out = self.engine.step(StepBatch(tokens=rows, slots=list(range(len(rows))),
                                         starts=[0] * len(rows), all_logits=True))
        return [out[i, :len(r)].float().cpu().clone() for i, r in enumerate(rows)]

    def info(self) -> dict:
        m = self.engine.model
        return {"interconnect": self.engine.comm.interconnect,
                "emulated": self.engine.comm.emulated,
                "residual": m.plan.label_for(m.config.n_layers),
                "residual_plan": m.plan.spec(m.config.n_layers), "adapted": self.adapted,
                "tp": self.engine.comm.world_size, "config": m.config.to_dict(),
                "max_seq": self.engine.max_seq, "n_slots": self.engine.n_slots,
                "has_tokenizer": self.tokenizer is not None,
                "max_token_chars": self.tokenizer.max_token_chars if self.tokenizer else 0}


def enter_netns(name: str) -> None:
    """Move this process into the network namespace `name` (/var/run/netns/<name>, as `ip netns
    add` makes it). Call it before any thread or socket exists: only the calling thread moves,
    and threads started later inherit its namespace."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, f"entering network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def rank_options(opts: GroupOptions, rank: int) -> GroupOptions:
    """In a rank's own process, first thing: with `netns`, move into the rank's namespace and
    return the options with its address there as `host`."""
    if not opts.netns:
        return opts
    enter_netns(opts.netns[rank])
    return replace(opts, host=opts.hosts[rank])


def _rank_main(rank: int, opts: GroupOptions, init_method: str | None, status: mp.Queue,
               conn) -> None:
    try:
        opts = rank_options(opts, rank)
        torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // opts.tp))
        comm = make_comm(opts, rank, init_method)
        ckpt, engine = build_engine(opts, rank, comm)
        leader = Leader(ckpt, engine) if rank == 0 else None
        comm.barrier()
    except BaseException as e:  # report to the parent, which stops the group
        status.put(("error", rank, f"{type(e).__name__}: {e}"))
        return
    status.put(("ready", rank, None))
    if rank != 0:
        try:
            engine.follow()
        finally:
            _shutdown(comm)
        return
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "close":
                break
            try:
                if cmd == "generate":
                    # one message per step, not per token: on a machine whose cores all run
                    # ranks, each message wakes the parent, which takes a core from a rank
                    for events in leader.generate_steps(*arg):
                        if events:
                            conn.send(("events", events))
                    conn.send(("done", None))
                elif cmd == "encode":
                    conn.send(("done", leader.encode(*arg)))
                elif cmd == "logits":
                    conn.send(("done", leader.logits(arg)))
                elif cmd == "timing":
                    conn.send(("done", engine.timing))
                elif cmd == "reset_timing":
                    engine.timing = StepTiming()
                    conn.send(("done", None))
                elif cmd == "info":
                    conn.send(("done", leader.info()))
            except (ValueError, RuntimeError) as e:
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        engine.stop_followers()
        _shutdown(comm)


def _shutdown(comm: Communicator) -> None:
    comm.close()
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


class GroupError(RuntimeError):
    pass


class LocalTPGroup:
    """A TP group of local processes. Use as a context manager; `close()` ends every rank."""

    def __init__(self, opts: GroupOptions | None = None, **kw) -> None:
        self.opts = opts or GroupOptions(**kw)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        status = ctx.Queue()
        # rank 0 hosts the rendezvous; in a namespace, at its address there (a fresh namespace
        # has every port free)
        init = f"tcp://{self.opts.hosts[0] if self.opts.hosts else '127.0.0.1'}:{free_port()}"
        self.procs = [ctx.Process(target=_rank_main, args=(r, self.opts, init, status,
                                                           child if r == 0 else None),
                                  daemon=True, name=f"ladder-rank{r}")
                      for r in range(self.opts.tp)]
        for p in self.procs:
            p.start()
        try:
            self._wait_ready(status)
        except GroupError:
            self.close()
            raise
        self.info = self._call("info", None)

    def _wait_ready(self, status: mp.Queue) -> None:
        """Every rank reports ready, or the first error (or death) fails the start."""
        deadline = time.monotonic() + self.opts.startup_timeout_s
        ready = 0
        while ready < self.opts.tp:
            try:
                kind, rank, msg = status.get(timeout=0.5)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    r, code = dead[0]
                    raise GroupError(f"rank {r} exited with code {code} during start-up")
                if time.monotonic() > deadline:
                    raise GroupError(f"the group did not start within "
                                     f"{self.opts.startup_timeout_s} s")
                continue
            if kind == "error":
                raise GroupError(f"rank {rank} failed to start: {msg}")
            ready += 1

    def _call(self, cmd: str, arg):
        self._conn.send((cmd, arg))
        kind, val = self._recv()
        return val

    def _recv(self):
        if not self._conn.poll(self.opts.op_timeout_s):
            raise GroupError(f"the leader did not answer within {self.opts.op_timeout_s} s")
        kind, val = self._conn.recv()
        if kind == "error":
            raise GroupError(val)
        return kind, val

    def stream(self, prompts: list[list[int]], params: list[SamplingParams]
               ) -> Iterator[TokenEvent]:
        self._conn.send(("generate", (prompts, params)))
        while True:
            kind, val = self._recv()
            if kind == "done":
                return
            yield from val

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
        """Run to completion; one dict per prompt: tokens, text, finish_reason, stats."""
        out = [new_result() for _ in prompts]
        for ev in self.stream(prompts, params):
            add_event(out[ev.request_id], ev)
        return out

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text` (as a user turn of the chat template with `chat`)."""
        return self._call("encode", (text, chat))

    def logits(self, rows: list[list[int]]) -> list[torch.Tensor]:
        return self._call("logits", rows)

    def timing(self) -> StepTiming:
        return self._call("timing", None)

    def reset_timing(self) -> None:
        self._call("reset_timing", None)

    def close(self) -> None:
        if self.procs and self.procs[0].is_alive():
            try:
                self._conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []

    def __enter__(self) -> "LocalTPGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

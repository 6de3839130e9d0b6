"""The group's link, built from its options: which communicator, bound to which address.

`make_comm` picks the backend (`auto`: none at TP=1, NCCL on CUDA, shared memory on CPU) and
joins the torch.distributed group beside it (the rendezvous, step plans, small collectives);
`bind_gloo` keeps gloo off the loopback address on a multi-node group.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

from ladder.links.base import Communicator, EmulatedLatency, NoComm, TorchComm
from ladder.links.detect import cuda_interconnect
from ladder.options import GroupOptions


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
                from ladder.links.tcp import TcpComm
                comm = TcpComm(rank, opts.tp, opts.host or "127.0.0.1",
                               cpu_group=dist.group.WORLD,
                               interconnect=opts.interconnect or "loopback",
                               timeout_s=opts.op_timeout_s)
            else:
                from ladder.links.shm import ShmComm
                # the segment's path adds rank 0's pid (told through gloo): the name only
                # makes /dev/shm readable, its port part need not be unique
                port = (init_method or os.environ.get("MASTER_PORT", "0")).rsplit(":", 1)[-1]
                name = "p" + "".join(c if c.isalnum() else "_" for c in port)
                comm = ShmComm(name, rank, opts.tp, cpu_group=dist.group.WORLD,
                               timeout_s=opts.op_timeout_s)
    return EmulatedLatency(comm, opts.latency_s) if opts.latency_s > 0 else comm


def close_comm(comm: Communicator) -> None:
    """Close the link and leave the torch.distributed group beside it."""
    comm.close()
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()

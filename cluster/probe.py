"""Measure a link: a real gloo all-reduce between Ray actors on two chosen nodes.

Each actor is pinned to its node (Ray's `node:<ip>` resource), binds gloo to its node's own
address and all-reduces a float32 tensor of `nbytes`; the result is the median time of `reps`
all-reduces after one warm-up, as seen by rank 0. Used by the launcher's tests (the cheap link
must be measurably slower than the high-end one) and by `ladder bench interconnects` (the raw
link beside the model figures).
"""

from __future__ import annotations

import time

import ray


@ray.remote(num_cpus=0)
class LinkProbe:
    def __init__(self, rank: int, ip: str) -> None:
        self.rank, self.ip = rank, ip

    def free_port(self) -> int:
        import socket
        with socket.socket() as s:
            s.bind((self.ip, 0))
            return s.getsockname()[1]

    def run(self, init: str, nbytes: int, reps: int) -> list[float]:
        import torch
        import torch.distributed as dist

        from ladder.links.factory import bind_gloo
        bind_gloo(self.ip)
        dist.init_process_group("gloo", init_method=init, rank=self.rank, world_size=2)
        try:
            x = torch.ones(max(1, nbytes // 4))
            times = []
            for i in range(reps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                if i:  # the first one warms the connection up
                    times.append(time.perf_counter() - t0)
            return times
        finally:
            dist.destroy_process_group()


def allreduce_time(ip_a: str, ip_b: str, nbytes: int = 4 << 20, reps: int = 5) -> float:
    """Seconds of the fastest of `reps` `nbytes` all-reduces between a rank on `ip_a` and one
    on `ip_b`: what the link can do (other work on the cores only adds to it; a median of 5
    read a 4 MiB reduce over the unshaped veth at 27 ms, as slow as 1 Gbit/s, while a test
    suite ran beside it)."""
    actors = [LinkProbe.options(resources={f"node:{ip}": 0.001}).remote(r, ip)
              for r, ip in enumerate((ip_a, ip_b))]
    try:
        port = ray.get(actors[0].free_port.remote(), timeout=60)
        init = f"tcp://{ip_a}:{port}"
        times = ray.get([a.run.remote(init, nbytes, reps) for a in actors], timeout=300)
        return min(times[0])
    finally:
        for a in actors:
            ray.kill(a)

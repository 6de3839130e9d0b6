"""Link presets and what one all-reduce costs on them.

A GPU link's all-reduce is priced the way NCCL's own tuner prices it (`ncclTopoTuneModel` in
NCCL's src/graph/tuning.cc, https://github.com/NVIDIA/nccl, read at commit 5067397, June 2026):
for each algorithm (ring, tree) and protocol (LL, LL128, Simple),

    time = base latency + hops x per-hop latency + message / algorithm bandwidth

and the cheapest enabled pair wins, as NCCL's tuner picks it. Ring: 2(p-1) steps, each moving
message/p (algorithm bandwidth = bus bandwidth x p / 2(p-1)). Tree: up and down the tree, the
message twice over (algorithm bandwidth = bus bandwidth / 2); NCCL's tree inside one node is a
chain (2(p-1) hops), across nodes a binary tree (2 log2 p hops). The base and per-hop latencies
are NCCL's `ncclTunerConstantsDefaults` for its three hardware classes (NVLink, PCI, NET); the
bus bandwidth is the link's line rate per direction times an achievable fraction, times NCCL's
per-protocol factors. LL128 is enabled only over NVLink, as NCCL enables it by default.

Our CPU links (`shm`, `tcp-*`) are not NCCL: every rank sends its partial to every peer and
sums what arrives (`ladder.links`), so `direct` prices them as latency + (p-1) x message /
bandwidth.

Beyond the algorithm, a link carries two calibrated terms: `overhead_s`, what each collective
costs the step beyond the algorithm (the launch and the wait for the slowest rank), and
`overlap_cost`, the share of an all-reduce's time that still lands on the compute it overlaps
(NCCL kernels take SMs and memory bandwidth; on a CPU, the transfer's own system calls and
copies run on the cores that compute: `ladder bench linkcost` measures it as 1 - efficiency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ladder.model.config import ConfigError

PROTOCOLS = ("LL", "LL128", "Simple")

# NCCL's tuner constants (tuning.cc, ncclTunerConstantsDefaults), microseconds.
_BASE_US = {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4)}
_HOP_US = {
    "nvlink": {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4)},
    "pci": {"tree": (1.0, 1.9, 4.0), "ring": (1.0, 2.5, 5.7)},
    # one rank per node: NCCL uses the tree's network latency for every algorithm ("with ppn=1
    # latencies are fully exposed, use the Tree network latency")
    "net": {"tree": (5.0, 8.5, 14.0), "ring": (5.0, 8.5, 14.0)},
}
# NCCL's per-protocol refinements of the bus bandwidth (ncclTopoTuneModel)
_RING_BW = (0.5, 0.92, 1.0)  # LL: half the bandwidth (flags in every 8 bytes); LL128: 120/128
_TREE_BW = (0.92 / 3.8, 0.92 * 7 / 9, 0.92)  # tree all-reduce x0.92; LL /3.8; LL128 7/9 in a node

FABRICS = ("nvlink", "pci", "net", "direct")


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """How the ranks of a TP group reach each other.

    fabric: NCCL's hardware class (`nvlink`, `pci`, `net`) or `direct` (our CPU links).
    bandwidth: bytes/s per direction, the line rate; efficiency: the achievable fraction of it.
    latency_s: for NCCL fabrics, added to NCCL's per-hop latency (a path NCCL's constants do not
        describe: host-memory staging, a kernel TCP stack); for `direct`, per exchange.
    measured: (ranks, bytes, seconds) all-reduce timings from a measured.json, used in place of
        the formula where they cover the message size (log-linear between sizes).
    step_overhead_s: what a step costs on this link beyond its all-reduces (our engine: the
        leader's step plan, two broadcasts); 0 for the presets.
    """

    name: str
    fabric: str
    bandwidth: float
    efficiency: float
    latency_s: float = 0.0
    overhead_s: float = 0.0
    overlap_cost: float = 0.0
    source: str = ""
    measured: tuple[tuple[int, int, float], ...] = field(default=())
    step_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if self.fabric not in FABRICS:
            raise ConfigError(f"link {self.name!r}: fabric {self.fabric!r} is not one of {FABRICS}")
        for f in ("bandwidth", "efficiency"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"link {self.name!r}: {f} must be positive")
        for f in ("latency_s", "overhead_s", "step_overhead_s"):
            if getattr(self, f) < 0:
                raise ConfigError(f"link {self.name!r}: {f} must not be negative")
        if not 0 <= self.overlap_cost <= 1:
            raise ConfigError(f"link {self.name!r}: overlap_cost must be within 0-1")

    @property
    def bus_bandwidth(self) -> float:
        return self.bandwidth * self.efficiency


def allreduce_seconds(link: Link, ranks: int, nbytes: float) -> float:
    """One all-reduce of `nbytes` (each rank's message) over `ranks` ranks; 0 at one rank."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    seen = measured_seconds(link, ranks, nbytes)
    if seen is not None:
        return seen
    if link.fabric == "direct":
        return link.overhead_s + link.latency_s + (ranks - 1) * nbytes / link.bus_bandwidth
    return link.overhead_s + min(_nccl_seconds(link, algo, proto, ranks, nbytes)
                                 for algo in ("ring", "tree") for proto in _protocols(link))


def _protocols(link: Link) -> range:
    return range(3) if link.fabric == "nvlink" else range(0, 3, 2)  # LL128: NVLink only


def _nccl_seconds(link: Link, algo: str, proto: int, ranks: int, nbytes: float) -> float:
    hop = _HOP_US[link.fabric][algo][proto] * 1e-6 + link.latency_s
    if algo == "ring":
        hops = 2 * (ranks - 1)
        wire = nbytes * hops / ranks / (link.bus_bandwidth * _RING_BW[proto])
    else:
        hops = 2 * (ranks - 1) if link.fabric != "net" else 2 * math.ceil(math.log2(ranks))
        wire = 2 * nbytes / (link.bus_bandwidth * _TREE_BW[proto])
    return _BASE_US[algo][proto] * 1e-6 + hops * hop + wire


def measured_seconds(link: Link, ranks: int, nbytes: float) -> float | None:
    """Interpolate the measured all-reduce times at `ranks` (linear in log size); None outside
    the measured sizes or without a measurement at that rank count."""
    pts = sorted((b, s) for r, b, s in link.measured if r == ranks)
    if not pts or not pts[0][0] <= nbytes <= pts[-1][0]:
        return None
    for (b0, s0), (b1, s1) in zip(pts, pts[1:]):
        if b0 <= nbytes <= b1:
            if b1 == b0:
                return s0
            w = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return s0 + w * (s1 - s0)
    return pts[0][1]  # a single measured size, asked exactly


# -- presets ----------------------------------------------------------------------------------
# GPU software terms, calibrated with the hardware's (hardware.py) on the paper's published
# batch-1 runs (Llama-3.1-70B, 8 x H100 SXM, gpt-fast + torch.compile; github.com/mayank31398/
# ladder-residual-inference, tools/plot-70b.py, tokens/s at TP 2 / 4 / 8: standard 35.42 /
# 59.41 / 77.39, ladder 36.69 / 67.51 / 101.22, desync 38.24 / 69.04 / 110.59 with NCCL P2P;
# NCCL_P2P_DISABLE=1: standard 33.77 / 53.35 / 51.66, ladder 36.94 / 66.6 / 82.59). Standard
# minus desync is 160 all-reduces of 16 KiB a token: 13 / 15 / 24 us each, where NCCL's tuner
# formula gives 8 / 10 / 15 us; the rest is launch and rank skew (GPU_OVERHEAD_S). Ladder keeps
# more of the communication than its schedule alone would (GPU_OVERLAP_COST: NCCL's kernels
# share the SMs and HBM with the compute they overlap). With P2P off an all-reduce costs 22 /
# 27 / 64 us: NCCL's SHM transport stages each hop through host memory (SHM_HOP_S on top of
# NCCL's PCI hop; the 8-GPU case also crosses CPU sockets). These five terms put all 15 runs
# within 7% (tests/test_plan.py holds it).
GPU_OVERHEAD_S = 7e-6
GPU_OVERLAP_COST = 0.2
SHM_HOP_S = 2e-6
# A kernel TCP exchange costs ~13 us here before any wire (ladder.links.tcp, a 576-float
# all-reduce between two ranks over loopback: 13.2 us; bench/results/2026-11-27-session8.md);
# NCCL's socket transport pays the same stack per hop, plus a switch (assumed 2 us).
TCP_HOP_S = 15e-6
# TCP goodput over Ethernet at MTU 1500: 1448 payload bytes (timestamps on) per 1538 on the wire
# (preamble, header, FCS, inter-frame gap) = 0.94.
TCP_EFFICIENCY = 0.94
_PCIE_EFF = 0.8  # assumption: TLP headers alone leave 0.91 at 256-byte payloads; calibrate it


def _gbe(gbit: float) -> Link:
    return Link(name=f"{gbit:g}gbe", fabric="net", bandwidth=gbit * 1e9 / 8,
                efficiency=TCP_EFFICIENCY, latency_s=TCP_HOP_S, overhead_s=GPU_OVERHEAD_S,
                overlap_cost=GPU_OVERLAP_COST,
                source=f"IEEE 802.3 {gbit:g} Gbit/s line rate; NCCL socket transport over kernel "
                "TCP (one GPU per node), no RDMA")


def _pcie(gen: int, p2p: bool) -> Link:
    per_dir = {4: 31.5e9, 5: 63.0e9}[gen]  # x16: 16 / 32 GT/s x 16 lanes x 128b/130b
    return Link(name=f"pcie{gen}" + ("" if p2p else "-nop2p"), fabric="pci", bandwidth=per_dir,
                efficiency=_PCIE_EFF if p2p else _PCIE_EFF / 2,
                latency_s=0.0 if p2p else SHM_HOP_S, overhead_s=GPU_OVERHEAD_S,
                overlap_cost=GPU_OVERLAP_COST,
                source=f"PCI-SIG PCIe {gen}.0 x16, {per_dir / 1e9:g} GB/s per direction "
                "(NVIDIA datasheets: 64 / 128 GB/s bidirectional)"
                + ("" if p2p else "; NCCL_P2P_DISABLE=1: NCCL's SHM transport stages every hop "
                   "through host memory (two PCIe crossings, reads from the host: half the "
                   "bandwidth assumed)"))


LINKS: dict[str, Link] = {
    "nvlink4": Link(name="nvlink4", fabric="nvlink", bandwidth=450e9, efficiency=0.8,
                    overhead_s=GPU_OVERHEAD_S, overlap_cost=GPU_OVERLAP_COST,
                    source="NVIDIA H100 / H200 SXM datasheets: NVLink 900 GB/s per GPU "
                    "(bidirectional) through NVSwitch; efficiency 0.8 assumed"),
    "nvlink3": Link(name="nvlink3", fabric="nvlink", bandwidth=300e9, efficiency=0.8,
                    overhead_s=GPU_OVERHEAD_S, overlap_cost=GPU_OVERLAP_COST,
                    source="NVIDIA A100 datasheet: NVLink 600 GB/s per GPU (bidirectional)"),
    "pcie4": _pcie(4, True),
    "pcie4-nop2p": _pcie(4, False),
    "pcie5": _pcie(5, True),
    "pcie5-nop2p": _pcie(5, False),
    "400g-ib": Link(name="400g-ib", fabric="net", bandwidth=50e9, efficiency=0.9,
                    overhead_s=GPU_OVERHEAD_S, overlap_cost=GPU_OVERLAP_COST,
                    source="InfiniBand NDR 400 Gbit/s (ConnectX-7), GPUDirect RDMA; NCCL's NET "
                    "latency constants are this class; efficiency 0.9 assumed"),
    "100gbe": _gbe(100),
    "25gbe": _gbe(25),
    "10gbe": _gbe(10),
    "1gbe": _gbe(1),
    # -- this machine's links (two ranks, one core each; ladder.links) --
    "shm": Link(name="shm", fabric="direct", bandwidth=10e9, efficiency=1.0, latency_s=10e-6,
                overlap_cost=0.8,
                source="README: ~10 us for a 576-float shared-memory all-reduce; DESIGN.md: "
                "SmolLM2 TP=2 standard 24.8 / ladder 24.3 / no communication 22.0 ms a token "
                "(efficiency 0.18: a spinning wait holds the core); 10 GB/s assumed"),
    "tcp-high-end": Link(name="tcp-high-end", fabric="direct", bandwidth=7.6e9, efficiency=1.0,
                         latency_s=12.9e-6, overlap_cost=0.9,
                         source="bench/results/2026-11-27-session8.md: ladder.links.tcp "
                         "between two ranks over loopback, 13.2 us for 2.3 KiB, 22.6 us for 72 "
                         "KiB; session9: over the unshaped veth it is all CPU work, 0-0.2 of "
                         "it hideable"),
    "tcp-cheap": Link(name="tcp-cheap", fabric="direct", bandwidth=125e6, efficiency=1.0,
                      latency_s=20e-6, overlap_cost=0.4,
                      source="cluster.links 'cheap': tbf 1 Gbit/s, MTU 9000; "
                      "bench/results/2026-11-27-session9.md: 636 us for 72 KiB, of which the "
                      "exchange's CPU is 0.34 (the hideable ceiling 0.61-0.69)"),
}


def preset_link(name: str) -> Link:
    try:
        return LINKS[name]
    except KeyError:
        raise ConfigError(f"--link {name!r}: not a preset ({', '.join(LINKS)}) or a "
                          "measured.json file") from None

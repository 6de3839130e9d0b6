"""Link profiles: what a node's link to the cluster's bridge is, and how `tc` shapes it.

A profile is `high-end` (the veth as it is: no shaping), `cheap` (1 Gbit/s, the commodity
Ethernet a TP group should not cross), or a rate (`100mbit`, `2.5gbit`, `800mbit`...). Any of
them may add an emulated per-message latency with `@` (`cheap@200us`): traffic control here has no
`netem` to delay packets, so the delay is added by the engine's communicator (a Work completes no
earlier than issue time + latency) and the interconnect label says so (`cheap+emu200us`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROFILES = {"high-end": 0, "cheap": 1_000_000_000}  # bit/s; 0 = unshaped

# A cluster's links carry jumbo frames. A real NIC cuts TCP's 64 KiB segments into frames and
# merges them back in hardware (TSO/GRO), so its host handles a 74 KiB all-reduce message in a few
# pieces. A veth shaped by tbf cannot: tbf cuts each segment into frames in software and releases
# them one timer tick at a time, and the receiving stack takes them one by one, all on the cores
# that compute. At 1500 bytes that cost 0.55 ms of CPU per 74 KiB exchange here, as much as the
# wire time it emulates; at 9000 bytes (jumbo frames, as cluster networks are set up) 0.2 ms.
DEFAULT_MTU = 9000
MTU_RANGE = (1280, 65535)  # IPv6's minimum; a veth's maximum

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)bit$")
_LATENCY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms)$")
_UNIT = {"k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True, slots=True)
class Link:
    label: str  # the profile's name: the node label and the metrics' `interconnect`
    rate_bit: int = 0  # tbf rate in bit/s; 0 = unshaped
    latency_s: float = 0.0  # emulated per-message latency, in the communicator

    @property
    def spec(self) -> str:
        if not self.latency_s:
            return self.label
        return f"{self.label}@{round(self.latency_s * 1e6)}us"

    def tbf_args(self, mtu: int = 1500) -> list[str]:
        """`tc qdisc ... tbf` arguments for this rate on a link of `mtu`: a bucket of one frame
        (at least 4 KiB, or 30 us of traffic where that is more) and a queue of 50 ms before
        drops.

        The bucket is what a message can take at once, faster than the rate: a tensor-parallel
        all-reduce message is 2-150 KiB, so a bucket of 1 ms of traffic (125 KiB at 1 Gbit/s)
        would let nearly every one through unshaped. With a bucket of one frame, a message
        crosses the link at the rate but for its first frame: a 74 KiB message takes 0.6 ms at
        1 Gbit/s, as on the wire, of which a 9000-byte frame is 72 us (tbf cuts
        segmentation-offload packets larger than the bucket into frames itself). Round trips
        measured here between two namespaces at 1 Gbit/s, 1500-byte frames (unshaped: 22-46 us):
        2.3 KiB 24 us, 8 KiB 125 us, 72 KiB 1.38 ms; with the old 125 KiB bucket: 24 us, 26 us
        and 46 us.
        """
        # tc keeps the bucket as whole microseconds of traffic at the rate: 2 us on top of the
        # frame (ethernet header included) keep it at least one frame after that rounding
        burst = max(4096, mtu + 64 + self.rate_bit * 2 // 8_000_000,
                    self.rate_bit * 30 // 8_000_000)
        return ["tbf", "rate", f"{self.rate_bit}bit", "burst", str(burst), "latency", "50ms"]


def parse_link(text: str) -> Link:
    """One profile: `high-end`, `cheap`, or a rate like `1gbit`, each optionally `@<latency>`."""
    name, _, lat = text.strip().partition("@")
    latency = 0.0
    if lat:
        m = _LATENCY.match(lat)
        if not m:
            raise ValueError(f"link {text!r}: the latency after @ must look like 200us or 2ms")
        latency = float(m[1]) / (1e6 if m[2] == "us" else 1e3)
    if name in PROFILES:
        return Link(name, PROFILES[name], latency)
    m = _RATE.match(name)
    if not m:
        raise ValueError(f"link {text!r} is not a profile ({', '.join(PROFILES)}) or a rate "
                         "such as 1gbit or 100mbit")
    rate = int(float(m[1]) * _UNIT[m[2]])
    if rate < 1_000_000:
        raise ValueError(f"link {text!r}: rates below 1mbit would stall Ray's own traffic")
    return Link(name, rate, latency)


def check_mtu(mtu: int) -> int:
    lo, hi = MTU_RANGE
    if not lo <= mtu <= hi:
        raise ValueError(f"--mtu {mtu}: a link's MTU must be {lo}-{hi} bytes (1500 is plain "
                         "Ethernet, 9000 jumbo frames)")
    return mtu


def parse_links(text: str, nodes: int) -> list[Link]:
    """One profile for every node, or a comma list with one per node (head first)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--link is empty")
    if len(parts) == 1:
        return [parse_link(parts[0])] * nodes
    if len(parts) != nodes:
        raise ValueError(f"--link lists {len(parts)} profiles for {nodes} nodes: give one for "
                         "all nodes or one per node (head first)")
    return [parse_link(p) for p in parts]

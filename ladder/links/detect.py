"""Which link joins a group's GPUs: NVLink, PCIe or the network, from NVML by GPU UUID."""

from __future__ import annotations

import socket

import torch


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


def node_interconnect() -> str:
    """This node's GPUs' link, for the node's label at `ray start`: `nvlink` when every pair
    has NVLink, `pcie` when some pair has not (or NVML cannot tell), `none` with fewer than two
    GPUs or no NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [pynvml.nvmlDeviceGetUUID(h) for h in handles]
    except Exception:  # no NVML (or no driver): nothing to tell
        return "none"
    uuids = [u.decode() if isinstance(u, bytes) else u for u in uuids]
    return gpu_link([(socket.gethostname(), u) for u in uuids], _nvml_nvlink)

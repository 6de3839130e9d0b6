"""measured.json: what `ladder plan --calibrate` measures on a machine, and how it is read.

`--hardware` and `--link` each take a preset name or a measured.json; `this-cpu` reads the one
at `hardware.measured_path()` when it exists, and so does a CPU link's name (`shm`, `tcp-...`)
that the file's "links" holds. The file is one JSON object; `--hardware` reads its "hardware"
section, `--link FILE` its "link" section and `--link FILE#NAME` the entry NAME of "links"
(what `--calibrate` writes: one per link it timed), each key optional:

    {
      "format": "ladder-plan-measured/1",
      "machine": "2-core AMD EPYC VM",                  # free text
      "created": "2026-12-04T10:00:00Z",
      "hardware": {                                     # replaces a preset's fields
        "name": "this-cpu",
        "dtype": "float32",
        "mem_bw": 1.6e10, "flops16": 1.6e11, "flops32": 8.3e10,   # peaks, per rank
        "efficiency": 0.8, "module_overhead_s": 2e-5, "step_overhead_s": 1e-3,
        "row_overhead_s": 2e-5, "memory": 0,
        "base": "this-cpu",                             # preset for the keys left out
        "compute": [                                    # measured module times
          {"shape": "d576-l30-h9-kv3-e64-f1536-v49152", "tp": 2, "dtype": "float32",
           "module": "attention", "batch": 8, "context": 512, "seconds": 1.1e-4,
           "rank": 0, "split": "even"},                 # optional: without rank, every
          ...                                           # rank's; without split, any split's
        ]                                               # modules: attention, mlp, lm_head
      },
      "link": {                                         # replaces a preset's fields
        "name": "tcp-cheap", "base": "tcp-cheap",
        "fabric": "direct", "bandwidth": 1.25e8, "efficiency": 1.0, "latency_s": 2e-5,
        "overhead_s": 0.0, "overlap_cost": 0.35, "step_overhead_s": 1e-4,
        "allreduce": [                                  # measured all-reduce times
          {"ranks": 2, "bytes": 2304, "seconds": 2.4e-5},
          {"ranks": 2, "bytes": 73728, "seconds": 6.4e-4}
        ]
      },
      "links": {"shm": {...}, "tcp-cheap": {...}}       # sections like "link", by name
    }

Keys left out keep the values of "base" (a preset: this-cpu for hardware, tcp-high-end for a
link); "name" defaults to the file's name (in "links": the entry's). Units: bytes, bytes/s,
FLOP/s, seconds; "memory" 0 means unknown. `shape` is `models.shape_key(config)`: a module time
is used for any model of that shape at that TP size, dtype and head split ("seconds": one decode
step's; with "rank", that rank's, else every rank's, so give the slowest rank's where ranks
differ). The planner interpolates measured module times linearly in batch, then in context,
within the measured grid, and all-reduce times linearly in log(bytes) within the measured
sizes; outside them it falls back to the roofline and the link formula with the file's
parameters. `overlap_cost` is the share of an overlapped all-reduce's time that still lands on
the compute beside it (1 - `ladder bench linkcost`'s efficiency at the size that matters).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ladder.model.config import ConfigError
from ladder.plan.hardware import ComputeSample, Hardware, measured_path, preset_hardware
from ladder.plan.links import LINKS, Link, preset_link

FORMAT = "ladder-plan-measured/1"
_HW_KEYS = ("dtype", "mem_bw", "flops16", "flops32", "efficiency", "module_overhead_s",
            "step_overhead_s", "row_overhead_s", "memory")
_LINK_KEYS = ("fabric", "bandwidth", "efficiency", "latency_s", "overhead_s", "overlap_cost",
              "step_overhead_s")
MODULES = ("attention", "mlp", "lm_head")


def read(path: Path, flag: str) -> dict[str, Any]:
    """The file's object, checked for its format; errors name the flag and the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{flag} {path}: not a measured.json (expected \"format\": "
                          f"\"{FORMAT}\")")
    return data


def resolve_hardware(spec: str) -> Hardware:
    """A preset name, or a measured.json's "hardware"; `this-cpu` prefers the machine's file."""
    if spec == "this-cpu" and measured_path().is_file():
        return hardware_from(read(measured_path(), "this-cpu's"), measured_path())
    if Path(spec).is_file():
        return hardware_from(read(Path(spec), "--hardware"), Path(spec))
    return preset_hardware(spec)


def resolve_link(spec: str) -> Link:
    """A preset name, a measured.json's "link", FILE#NAME (its "links" entry NAME), or a name
    that this machine's measured.json holds among its "links" (CPU links only: a GPU preset's
    name always means the preset)."""
    path, _, name = spec.rpartition("#")
    if path and Path(path).is_file():
        return link_from(read(Path(path), "--link"), Path(path), name)
    if Path(spec).is_file():
        return link_from(read(Path(spec), "--link"), Path(spec))
    machine = measured_path()
    if (spec not in LINKS or LINKS[spec].fabric == "direct") and machine.is_file():
        data = read(machine, "this machine's")
        if isinstance(data.get("links"), dict) and spec in data["links"]:
            return link_from(data, machine, spec)
    return preset_link(spec)


def hardware_from(data: dict[str, Any], path: Path) -> Hardware:
    sec = _section(data, "hardware", path)
    base = preset_hardware(str(sec.get("base", "this-cpu")))
    fields = _numbers(sec, _HW_KEYS, "hardware", path)
    samples = tuple(_sample(s, path) for s in _list(sec, "compute", path))
    try:
        return dataclasses.replace(base, name=str(sec.get("name", path.name)),
                                   source=f"measured: {path}", measured=samples, **fields)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def link_from(data: dict[str, Any], path: Path, name: str | None = None) -> Link:
    """The file's "link" section, or with `name` its "links" entry of that name."""
    if name is None:
        sec = _section(data, "link", path)
    else:
        links = _section(data, "links", path)
        if not isinstance(links.get(name), dict):
            raise ConfigError(f"{path}: \"links\" has no link {name!r} (it has "
                              f"{', '.join(sorted(links)) or 'none'})")
        sec = links[name]
    base = preset_link(str(sec.get("base", "tcp-high-end")))
    fields = _numbers(sec, _LINK_KEYS, "link", path)
    timed = []
    for i, e in enumerate(_list(sec, "allreduce", path)):
        try:
            timed.append((int(e["ranks"]), int(e["bytes"]), float(e["seconds"])))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: link.allreduce[{i}] needs ranks, bytes and seconds "
                              "numbers") from None
    try:
        return dataclasses.replace(base, name=str(sec.get("name", name or path.name)),
                                   source=f"measured: {path}", measured=tuple(timed), **fields)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _section(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    sec = data.get(key)
    if not isinstance(sec, dict):
        raise ConfigError(f"{path}: has no \"{key}\" section")
    return sec


def _list(sec: dict[str, Any], key: str, path: Path) -> list[Any]:
    items = sec.get(key, [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: \"{key}\" must be a list")
    return items


def _numbers(sec: dict[str, Any], keys: tuple[str, ...], what: str,
             path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        if k not in sec:
            continue
        v = sec[k]
        if k in ("dtype", "fabric"):
            out[k] = str(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        else:
            raise ConfigError(f"{path}: {what}.{k} must be a number, got {v!r}")
    return out


def _sample(s: Any, path: Path) -> ComputeSample:
    try:
        rank, split = s.get("rank"), s.get("split")
        sample = ComputeSample(shape=str(s["shape"]), tp=int(s["tp"]), dtype=str(s["dtype"]),
                               module=str(s["module"]), batch=int(s["batch"]),
                               context=int(s["context"]), seconds=float(s["seconds"]),
                               rank=None if rank is None else int(rank),
                               split=None if split is None else str(split))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"{path}: a hardware.compute entry needs shape, tp, dtype, module, "
                          f"batch, context and seconds (and may name a rank): {s!r}") from None
    if sample.module not in MODULES:
        raise ConfigError(f"{path}: hardware.compute module {sample.module!r} is not one of "
                          f"{MODULES}")
    return sample

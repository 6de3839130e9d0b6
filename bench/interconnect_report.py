"""What `bench.interconnects` makes of its cells: ladder's overlap efficiency and each residual's
speedup over standard, the tables, the JSON line and the PNG/HTML report, and the figures as
Prometheus gauges (`ladder_bench_*`)."""

from __future__ import annotations

from pathlib import Path

from bench.table import table
from bench.timed import emit, log


def overlap(cells: list[dict]) -> list[dict]:
    """Per link, batch and prompt length: (T_std - T_ladder) / (T_std - T_desync), direct."""
    by = {(c["link"], c["batch"], c["prompt_len"], c["residual"]): c for c in cells
          if c["path"] == "direct"}
    out = []
    for (link, b, plen, res), c in sorted(by.items()):
        if res != "ladder":
            continue
        std, des = by.get((link, b, plen, "standard")), by.get((link, b, plen, "desync"))
        if std is None or des is None:
            continue
        gap = std["ms_per_token"] - des["ms_per_token"]
        out.append({"link": link, "interconnect": c["interconnect"], "batch": b,
                    "prompt_len": plen,
                    "efficiency": (std["ms_per_token"] - c["ms_per_token"]) / gap
                    if gap > 0 else None,
                    "live": 1 - c["exposed_ms"] / std["exposed_ms"]
                    if std["exposed_ms"] > 0 else None})
    return out


def speedups(cells: list[dict]) -> list[dict]:
    """ladder (and partial, parallel) over standard per-token latency, per path/link/cell."""
    by = {(c["path"], c["link"], c["batch"], c["prompt_len"], c["residual"]): c for c in cells}
    out = []
    for (path, link, b, plen, res), c in sorted(by.items()):
        std = by.get((path, link, b, plen, "standard"))
        if std is None or res in ("standard", "desync"):
            continue
        out.append({"path": path, "link": link, "batch": b, "prompt_len": plen,
                    "residual": res, "speedup": std["ms_per_token"] / c["ms_per_token"]})
    return out


class Gauges:
    """The bench's figures as Prometheus gauges (prometheus-client: this process is outside
    Ray's metrics), served on `port` while the run lasts and written as a text file after."""

    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server
        self.registry = CollectorRegistry()
        labels = ["path", "interconnect", "residual", "batch", "prompt_len"]
        self.g = {k: Gauge(f"ladder_bench_{k}", doc, labels, registry=self.registry)
                  for k, doc in (("decode_seconds_per_token", "median per-token decode latency"),
                                 ("ttft_seconds", "median time to first token"),
                                 ("throughput_tokens_per_second", "new tokens / wall time"))}
        if port:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def set(self, c: dict) -> None:
        lab = dict(path=c["path"], interconnect=c["interconnect"], residual=c["residual"],
                   batch=str(c["batch"]), prompt_len=str(c["prompt_len"]))
        self.g["decode_seconds_per_token"].labels(**lab).set(c["ms_per_token"] / 1e3)
        self.g["ttft_seconds"].labels(**lab).set(c["ttft_ms"] / 1e3)
        self.g["throughput_tokens_per_second"].labels(**lab).set(c["tok_s"])

    def write(self, path: Path) -> None:
        from prometheus_client import write_to_textfile
        write_to_textfile(str(path), self.registry)


def report(result: dict, out: str | None) -> None:
    cells = result["cells"]
    rows = [[c["path"], c["interconnect"], c["residual"], c["batch"], c["prompt_len"],
             c["ms_per_token"], c.get("range_ms"), c.get("exposed_ms"), c["ttft_ms"], c["tok_s"]]
            for c in cells]
    mtu = f", links of MTU {result['mtu']}" if result.get("mtu") else ""
    reps = f", direct: medians of {result['reps']} interleaved reps" if result.get("reps") else ""
    print(table(f"TP=2 {result['model']} {result['dtype']}, {result['tokens']} new tokens a "
                f"request{mtu}{reps}",
                ["path", "interconnect", "residual", "batch", "prompt", "ms/token", "range ms",
                 "exposed ms", "TTFT ms", "tok/s"], rows))
    print(table("ladder's overlap efficiency (T_std - T_ladder) / (T_std - T_desync), direct; "
                "live estimate beside it",
                ["interconnect", "batch", "prompt", "efficiency", "live"],
                [[o["interconnect"], o["batch"], o["prompt_len"], o["efficiency"], o["live"]]
                 for o in result["overlap"]]))
    print(table("speedup over standard (per-token decode latency)",
                ["path", "link", "batch", "prompt", "residual", "speedup"],
                [[s["path"], s["link"], s["batch"], s["prompt_len"], s["residual"],
                  s["speedup"]] for s in result["speedup"]]))
    emit(result, out, "interconnects")
    if out:
        from dashboards.report import render
        rows = report_rows(result)
        render(rows, Path(out) / "interconnects.png", Path(out) / "interconnects.html",
               f"ladder vs standard by interconnect: TP=2 {result['model']}, batch "
               f"{rows[0]['batch'] if rows else '-'}")
        log(f"wrote {out}/interconnects.png, .html, .prom and the JSON line")


def report_rows(result: dict) -> list[dict]:
    """The report's rows: direct path, the smallest batch and prompt."""
    cells = [c for c in result["cells"] if c["path"] == "direct" and c["residual"] != "desync"]
    if not cells:
        return []
    b = min(c["batch"] for c in cells)
    plen = min(c["prompt_len"] for c in cells)
    eff = {o["interconnect"]: o["efficiency"] for o in result["overlap"]
           if o["batch"] == b and o["prompt_len"] == plen}
    return [{"interconnect": c["interconnect"], "residual": c["residual"], "batch": b,
             "ms_per_token": c["ms_per_token"], "exposed_ms_per_token": c["exposed_ms"],
             "overlap": eff.get(c["interconnect"]) if c["residual"] == "ladder" else None}
            for c in cells if c["batch"] == b and c["prompt_len"] == plen]

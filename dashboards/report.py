"""`ladder report`: the interconnect comparison as a PNG and a self-contained HTML page.

From a Prometheus that scrapes a serving cluster (`--prometheus URL`: per interconnect and
residual mode, mean decode time per token, exposed all-reduce wait per token, overlap
efficiency, over `--window`), or from a `bench.decode` JSON line (`--bench FILE`: its overlap
part, one row per link). No Grafana needed.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path


class ReportError(RuntimeError):
    pass


def from_prometheus(url: str, window: str = "10m") -> list[dict]:
    """Rows {interconnect, residual, ms_per_token, exposed_ms_per_token, overlap}."""
    def q(expr: str) -> dict[tuple[str, str], float]:
        full = f"{url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(full, timeout=30) as r:
                body = json.loads(r.read())
        except OSError as e:
            raise ReportError(f"{url}: cannot query Prometheus ({e})") from None
        if body.get("status") != "success":
            raise ReportError(f"{url}: query failed: {body.get('error')}")
        return {(m["metric"].get("interconnect", "?"), m["metric"].get("residual", "?")):
                float(m["value"][1]) for m in body["data"]["result"]}

    by = "interconnect, residual"
    tokens = f"sum by ({by}) (increase(ray_ladder_decode_tokens_total[{window}]))"
    step = q(f"sum by ({by}) (increase(ray_ladder_decode_step_seconds_sum[{window}])) / "
             f"{tokens}")
    exposed = q(f"sum by ({by}) (increase(ray_ladder_allreduce_exposed_seconds_sum[{window}]))"
                f" / {tokens}")
    overlap = q(f"sum by ({by}) (increase(ray_ladder_overlap_efficiency_sum[{window}])) / "
                f"sum by ({by}) (increase(ray_ladder_overlap_efficiency_count[{window}]))")
    rows = [{"interconnect": k[0], "residual": k[1], "ms_per_token": 1e3 * v,
             "exposed_ms_per_token": 1e3 * exposed.get(k, float("nan")),
             "overlap": overlap.get(k)} for k, v in sorted(step.items()) if v == v]
    if not rows:
        raise ReportError(f"{url}: no ladder-serve decode series in the last {window}")
    return rows


def from_bench(path: str) -> list[dict]:
    try:
        d = json.loads(Path(path).read_text().strip().splitlines()[-1])
        links = d["overlap"]["links"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ReportError(f"{path}: not a bench.decode JSON line with an overlap part ({e})") \
            from None
    rows = []
    for link in links:
        name = link["interconnect"] + (" (emulated)" if link.get("emulated") else "")
        for res, ms in link["per_token_ms"].items():
            rows.append({"interconnect": name, "residual": res, "ms_per_token": ms,
                         "exposed_ms_per_token": link["exposed_ms_per_token"].get(res),
                         "overlap": link["overlap_efficiency"] if res == "ladder" else None})
    return rows


def render(rows: list[dict], png: Path, page: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    links = sorted({r["interconnect"] for r in rows})
    modes = sorted({r["residual"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(modes))
    for j, (key, label) in enumerate((("ms_per_token", "decode ms per token"),
                                      ("exposed_ms_per_token", "exposed all-reduce ms per token"),
                                      ("overlap", "overlap efficiency"))):
        ax = axes[j]
        for k, mode in enumerate(modes):
            vals = [next((r[key] for r in rows if r["interconnect"] == li
                          and r["residual"] == mode and r[key] is not None), 0.0) or 0.0
                    for li in links]
            ax.bar([i + k * width for i in range(len(links))], vals, width, label=mode)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(links))], links,
                      rotation=15)
        ax.set_title(label)
        if j == 2:
            ax.set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    b64 = base64.b64encode(png.read_bytes()).decode()
    cells = "".join(
        f"<tr><td>{html.escape(r['interconnect'])}</td><td>{html.escape(r['residual'])}</td>"
        f"<td>{r['ms_per_token']:.2f}</td><td>{_f(r['exposed_ms_per_token'])}</td>"
        f"<td>{_f(r['overlap'])}</td></tr>" for r in rows)
    page.write_text(
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><img alt='interconnect comparison' "
        f"src='data:image/png;base64,{b64}'><table border=1 cellpadding=4><tr><th>interconnect"
        "</th><th>residual</th><th>ms/token</th><th>exposed ms/token</th><th>overlap</th></tr>"
        f"{cells}</table>\n")


def _f(v) -> str:
    return "-" if v is None or v != v else f"{v:.2f}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render the interconnect comparison to PNG + HTML",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", help="Prometheus base URL")
    src.add_argument("--bench", help="a bench.decode JSON file")
    p.add_argument("--window", default="10m", help="Prometheus look-back (default 10m)")
    p.add_argument("--out", default="report", help="output prefix: <out>.png and <out>.html")
    p.set_defaults(func=run)


def run(a) -> int:
    try:
        rows = from_prometheus(a.prometheus, a.window) if a.prometheus else from_bench(a.bench)
    except ReportError as e:
        print(f"ladder report: {e}", file=sys.stderr)
        return 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, page = out.with_suffix(".png"), out.with_suffix(".html")
    render(rows, png, page, "ladder-serve: ladder vs standard by interconnect")
    print(f"wrote {png} and {page} ({len(rows)} rows)")
    return 0

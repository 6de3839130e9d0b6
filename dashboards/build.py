"""Grafana dashboards from `spec.py`, built with grafana-foundation-sdk into committed JSON.

`ladder dashboards build` writes dashboards/<name>.json; `--check` fails (exit 1) when a
committed file differs from what the code generates (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import timeseries as gt
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from dashboards.spec import DASHBOARDS, PanelSpec

HERE = Path(__file__).parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
VARIABLES = (("model", "ray_ladder_decode_tokens_total", "model"),
             ("tp", "ray_ladder_decode_tokens_total", "tp"),
             ("interconnect", "ray_ladder_decode_tokens_total", "interconnect"))


def panel(p: PanelSpec, i: int) -> gt.Panel:
    b = (gt.Panel().title(p.title).unit(p.unit).datasource(DS).height(8).span(12)
         .description(p.description))
    for j, q in enumerate(p.queries):
        b = b.with_target(gp.Dataquery().expr(q.expr).legend_format(q.legend)
                          .ref_id(chr(ord("A") + j)).datasource(DS))
    return b


def dashboard(uid: str, title: str, panels: tuple[PanelSpec, ...]) -> dict:
    d = (gd.Dashboard(title).uid(uid).tags(["ladder-serve"]).refresh("10s")
         .time("now-30m", "now").timezone("browser")
         .with_variable(gd.DatasourceVariable("datasource").label("Prometheus")
                        .type("prometheus")))
    for name, metric, label in VARIABLES:
        d = d.with_variable(
            gd.QueryVariable(name).label(name).datasource(DS)
            .query(f"label_values({metric}, {label})").multi(True).include_all(True)
            .all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
    for i, p in enumerate(panels):
        d = d.with_panel(panel(p, i))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(d.build()))


def generate() -> dict[str, str]:
    """name -> JSON text of every dashboard."""
    return {name: json.dumps(dashboard(uid, title, panels), indent=2, sort_keys=True) + "\n"
            for name, (uid, title, panels) in DASHBOARDS.items()}


def build(check: bool = False) -> int:
    stale = []
    for name, text in generate().items():
        path = HERE / f"{name}.json"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run `ladder dashboards build`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboards", help="Grafana dashboards: build the JSON, push it")
    cmds = p.add_subparsers(dest="dashboards_cmd", required=True)
    b = cmds.add_parser("build", help="write dashboards/*.json from dashboards/spec.py")
    b.add_argument("--check", action="store_true", help="only check the committed JSON")
    b.set_defaults(func=lambda a: build(a.check))
    p_ = cmds.add_parser("push", help="upload the dashboards to Grafana (grafana-client)")
    p_.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://grafana:3000")
    p_.add_argument("--token", required=True, help="a service-account token (Editor)")
    p_.add_argument("--timeout", type=float, default=10.0)

    def _push(a):
        from dashboards.push import run
        return run(a)
    p_.set_defaults(func=_push)

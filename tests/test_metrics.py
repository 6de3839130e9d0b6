"""Metrics and dashboards against a real Prometheus scraping the real three-node cluster.

TP=2 groups of a tiny model serve traffic in three residual modes (standard, partial ladder,
ladder) on two interconnects (PACK: shm; STRICT_SPREAD: network). Prometheus (the Debian
package, installed here if missing) scrapes every node's Ray metrics agent, found through Ray's
service-discovery file as dashboards/prometheus.yml says; every PromQL expression of every
dashboard panel must return data with the expected label values.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from dashboards.build import build
from dashboards.spec import DASHBOARDS

RESIDUALS = {"standard": "standard", "ladder:1-3": "partial", "ladder": "ladder"}
LINKS = {"PACK": "shm", "STRICT_SPREAD": "network"}


def test_dashboard_json_is_in_sync_with_the_code():
    assert build(check=True) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:  # the Debian package, as the set-up of these tests installs it
        subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], check=True,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                       capture_output=True, timeout=600)
        path = shutil.which("prometheus")
    assert path, "prometheus did not install"
    return path


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    import yaml
    cfg = yaml.safe_load(Path("dashboards/prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "2s", "evaluation_interval": "2s"}
    sd = cfg["scrape_configs"][0]["file_sd_configs"][0]
    sd["files"] = [str(Path(ray_cluster.temp_dir) / "prom_metrics_service_discovery.json")]
    sd["refresh_interval"] = "2s"
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with running_prometheus(d / "prometheus.yml", d / "data") as url:
        yield url


@contextmanager
def running_prometheus(config: Path, data: Path):
    """A Prometheus of ours on a free port with `config`, until the block ends; its URL."""
    port = free_port()
    proc = subprocess.Popen([prometheus_binary(), f"--config.file={config}",
                             f"--storage.tsdb.path={data}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(url: str, expr: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=30) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def traffic(ray_cluster, tiny_llama, prometheus):
    """Six groups (3 residual modes x 2 links), two waves of requests each, kept alive until
    Prometheus has scraped them."""
    from actors.group import TPGroup
    from ladder.engine.sampling import SamplingParams
    from ladder.engine.scheduler import RequestError
    from ladder.options import GroupOptions
    groups = []
    try:
        for strategy in LINKS:
            for residual in RESIDUALS:
                groups.append(TPGroup(
                    GroupOptions(model=str(tiny_llama), tp=2, residual=residual, n_slots=4,
                                 max_seq=256), strategy=strategy, cpus_per_worker=0.25,
                    model_label="tiny"))
        sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        serve_url = start_serve_app(tiny_llama)
        for wave in range(2):
            for body in ({"model": "tiny-serve", "prompt": [5, 6, 7], "max_tokens": 8},
                         {"model": "tiny-serve", "prompt": [5, 6, 7], "max_tokens": -1}):
                post(serve_url + "/v1/completions", body)
            for g in groups:
                g.generate([[5 + i, 6, 7] for i in range(3)], sp)
                with pytest.raises(RequestError):
                    g.generate([list(range(3, 300))], sp)  # longer than the context
            time.sleep(8)  # pushed (2 s) and scraped (2 s) between the waves
        deadline = time.monotonic() + 60
        want = {(link, res) for link in LINKS.values() for res in RESIDUALS.values()}
        while time.monotonic() < deadline:
            got = {(r["metric"]["interconnect"], r["metric"]["residual"]) for r in query(
                prometheus, "sum by (interconnect, residual) "
                            "(increase(ray_ladder_decode_tokens_total[1m]))")
                if float(r["value"][1]) > 0}
            if want <= got:
                break
            time.sleep(2)
        yield groups
    finally:
        for g in groups:
            g.shutdown()
        from ray import serve
        serve.shutdown()


def start_serve_app(tiny_llama) -> str:
    """A Serve app of the tiny model (autoscaling on, so Serve's autoscaler reports), labelled
    model "tiny-serve": the panels below select model "tiny", the six groups."""
    from ray import serve

    from deploy.server import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app({"model": str(tiny_llama), "model_name": "tiny-serve", "tp": 1,
                         "residual": "standard", "n_slots": 2, "max_seq": 256,
                         "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}),
              name="tiny", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def expressions():
    for name, (_, _, panels) in DASHBOARDS.items():
        for p in panels:
            for q in p.queries:
                yield pytest.param(q.expr, id=f"{name}:{p.title[:40]}:{q.legend[:12]}")


@pytest.mark.parametrize("expr", list(expressions()))
def test_every_panel_query_returns_data(prometheus, traffic, expr):
    # the dashboard with model "tiny" selected (the session cluster served other models before)
    concrete = (expr.replace("$model", "tiny").replace("$tp", ".*")
                .replace("$interconnect", ".*").replace("$__rate_interval", "2m"))
    result = query(prometheus, concrete)
    values = [float(r["value"][1]) for r in result]
    assert result and any(v == v for v in values), f"no data: {concrete}"  # v == v: not NaN
    for r in result:
        m = r["metric"]
        if "interconnect" in m:
            assert m["interconnect"] in LINKS.values()
        if "residual" in m:
            assert m["residual"] in RESIDUALS.values()
        if "model" in m:
            assert m["model"] == "tiny"
    apps = {r["metric"]["application"] for r in result if "application" in r["metric"]}
    assert not apps or "tiny" in apps  # Serve's own series: every application, ours among them
    if "by (interconnect, residual)" in expr and "histogram_quantile" not in expr:
        seen = {(r["metric"].get("interconnect"), r["metric"].get("residual")) for r in result}
        assert {("shm", "standard"), ("network", "partial")} <= seen


def test_report_from_prometheus(prometheus, traffic, tmp_path):
    from dashboards.report import from_prometheus, render
    rows = from_prometheus(prometheus, "5m")
    seen = {(r["interconnect"], r["residual"]) for r in rows}
    assert {(link, res) for link in LINKS.values() for res in RESIDUALS.values()} <= seen
    assert all(r["ms_per_token"] > 0 for r in rows)
    png, page = tmp_path / "report.png", tmp_path / "report.html"
    render(rows, png, page, "interconnects")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert "network" in page.read_text()


def test_report_names_an_unreachable_prometheus():
    from dashboards.report import ReportError, from_prometheus
    with pytest.raises(ReportError, match="cannot query Prometheus"):
        from_prometheus(f"http://127.0.0.1:{free_port()}")


"""`ladder serve`: start (or join) a Ray cluster and serve a Serve config's application.

With no `--address`, starts a local Ray instance (token authentication on) sized so that the
config's replicas fit, runs the application, prints the URL with a `curl` and an `openai`
example, and stays up until Ctrl-C (or SIGTERM), then shuts Serve and Ray down.
"""

import argparse
import math
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).with_name("smollm2.yaml")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="a Serve config YAML (default: deploy/smollm2.yaml)")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--host", default=None, help="HTTP host (default: the config's, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    p.set_defaults(func=run)


def load_config(path: str) -> tuple[dict, dict]:
    """(http_options, the first application's entry) of a Serve config YAML."""
    import yaml
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{p}: no such config file") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"{p}: not valid YAML: {e}") from None
    apps = (doc or {}).get("applications") or []
    if not apps or "args" not in apps[0]:
        raise SystemExit(f"{p}: needs an `applications` list whose first entry has `args`")
    return dict(doc.get("http_options") or {}), apps[0]


def cpus_needed(args: dict) -> int:
    """Logical CPUs for the most replicas the config may run (threads per rank; the replica
    itself reserves none)."""
    reps = (args.get("autoscaling_config") or {}).get("max_replicas",
                                                     args.get("num_replicas", 1))
    per = args.get("tp", 2) * args.get("threads", 1)
    return math.ceil(reps * per)


def deploy_failure(serve, app: str) -> str | None:
    """The last error line of the first unhealthy deployment's message (a replica's traceback
    ends with the exception that stopped its constructor)."""
    try:
        st = serve.status().applications[app]
    except Exception:
        return None
    for d in st.deployments.values():
        lines = [x.strip() for x in (d.message or "").splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x.split(":", 1)[0]]
        if errors:
            return errors[-1]
    return st.message or None


def banner(url: str, model: str, keyed: bool, ready_s: float, dashboard: str | None = None
           ) -> str:
    """What `ladder serve` prints once ready: where, a request to copy, and (for the local Ray
    it started) where to look at metrics. The example names no key of the config's: keys stay
    out of terminals and logs."""
    key = "$LADDER_API_KEY" if keyed else "none"
    watch = ""
    if dashboard:
        watch = (f"  metrics: prometheus --config.file=dashboards/prometheus.yml (finds this "
                 f"cluster's agents); Ray dashboard {dashboard}\n\n")
    return (f"ladder-serve: {model} on {url}/v1 (ready in {ready_s:.0f} s; Ctrl-C stops)\n\n"
            f"{watch}"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"       -H \"Authorization: Bearer {key}\" \\\n"
            f"       -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"Hello!\"}}], \"max_tokens\": 32}}'\n\n"
            f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
            f"api_key='{key}'); print(c.chat.completions.create(model='{model}', "
            f"messages=[{{'role': 'user', 'content': 'Hello!'}}], max_tokens=32)"
            ".choices[0].message.content)\"\n")


def dashboard_port() -> int:
    """Ray's usual dashboard port, 8265, when it is free; else any free one."""
    import socket

    from ladder.links.factory import free_port
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8265))
            return 8265
        except OSError:
            return free_port()


def run(a: argparse.Namespace) -> int:
    http, appcfg = load_config(a.config)
    args = dict(appcfg["args"])
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported: read once
    local = a.address is None
    if local:
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    import ray
    from ray import serve

    from deploy.config import split_args
    from deploy.server import build_app

    try:  # a bad setting fails here, naming the file, before any cluster starts
        keyed = bool(split_args(args)[0].resolve_keys().api_keys)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{a.config}: {e}") from None

    host = a.host or http.get("host", "127.0.0.1")
    port = a.port or int(http.get("port", 8000))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.perf_counter()
    dashboard = None
    if local:  # with its dashboard: the head writes the Prometheus service-discovery file that
        # dashboards/prometheus.yml reads (without it, Prometheus finds no target)
        dash_port = dashboard_port()
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed(args)),
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash_port,
                 log_to_driver=False)
        dashboard = f"http://127.0.0.1:{dash_port}"
    else:
        ray.init(address=a.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        name = appcfg.get("name", "ladder")
        try:
            serve.run(build_app(args), name=name, route_prefix=appcfg.get("route_prefix", "/"))
        except RuntimeError as e:  # Serve says only "failed to update": say why
            print(f"ladder serve: {a.config}: the application did not start: "
                  f"{deploy_failure(serve, name) or e}", file=sys.stderr, flush=True)
            return 1
        print(banner(f"http://{host}:{port}", args.get("model_name", "smollm2"), keyed,
                     time.perf_counter() - t0, dashboard), flush=True)
        while not stop.wait(1.0):
            pass
        print("ladder-serve: shutting down", file=sys.stderr, flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0

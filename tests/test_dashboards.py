"""`ladder dashboards push` error paths and `ladder report` from benchmark JSON.

No Grafana can run here: push is tested against an unreachable URL and against a local HTTP
server that answers every request 401, as Grafana does for a bad token. The report from a real
Prometheus is in test_metrics.py.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from dashboards.push import PushError, push
from dashboards.report import ReportError, from_bench, render


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_to_an_unreachable_url_says_so():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PushError, match="cannot reach Grafana"):
        push(url, "token", timeout_s=3)


class _Refuse(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = json.dumps({"message": "invalid API key"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _deny

    def log_message(self, *args):
        pass


def test_push_with_a_bad_token_says_so():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(PushError, match="rejected the token"):
            push(f"http://127.0.0.1:{server.server_address[1]}", "not-a-token", timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()


def test_push_command_exits_1_with_a_message(capsys):
    from ladder.cli import main
    assert main(["dashboards", "push", "--url", f"http://127.0.0.1:{free_port()}",
                 "--token", "x", "--timeout", "3"]) == 1
    assert "cannot reach Grafana" in capsys.readouterr().err


def bench_line() -> dict:
    link = lambda name, std, lad, eff, emu=False: {  # noqa: E731
        "interconnect": name, "emulated": emu,
        "per_token_ms": {"standard": std, "ladder": lad, "desync": 30.0},
        "exposed_ms_per_token": {"standard": std - 30, "ladder": lad - 30, "desync": 0.0},
        "overlap_efficiency": eff}
    return {"bench": "decode", "overlap": {"links": [link("loopback", 76.4, 62.9, 0.41),
                                                     link("shm", 37.0, 37.1, 0.0),
                                                     link("shm+emu200us", 41.0, 36.1, 0.78,
                                                          True)]}}


def test_report_from_bench_json(tmp_path):
    f = tmp_path / "decode.json"
    f.write_text("some log line\n" + json.dumps(bench_line()) + "\n")
    rows = from_bench(str(f))
    assert {r["interconnect"] for r in rows} == {"loopback", "shm", "shm+emu200us (emulated)"}
    png, page = tmp_path / "r.png", tmp_path / "r.html"
    render(rows, png, page, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = page.read_text()
    assert "data:image/png;base64," in text and "loopback" in text


def test_report_names_a_bad_file(tmp_path):
    f = tmp_path / "nope.json"
    f.write_text("{}")
    with pytest.raises(ReportError, match="nope.json"):
        from_bench(str(f))

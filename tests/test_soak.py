"""`python -m bench.soak` end to end, short: `ladder serve` (the README's main command with its
own local Ray, the config on the tiny chat model) under streaming, plain, cancelled and hostile
clients, with shard workers killed; every request is accounted for, none is lost, and after
Ctrl-C it exits 0, its port is closed and nothing is left running or in /dev/shm.

The long run (64 clients, 10 minutes, a kill every 2 minutes, SmolLM2) is in bench/results/.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_soak_loses_nothing(tiny_chat, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.soak", "--model", str(tiny_chat),
                        "--clients", "6", "--minutes", "0.75", "--kill-every", "0.37",
                        "--max-tokens", "12", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, (data, r.stderr[-3000:])
    n = data["requests"]
    assert n["lost"] == 0, data["lost_examples"]
    assert n["completed"] > 0 and n["refused"] > 0 and n["cancelled"] > 0
    assert len(data["kills"]) == 1 and all(k["pid"] for k in data["kills"])
    assert all(k["recovered_s"] is not None for k in data["kills"]), data["kills"]
    assert data["slots_after"] == {"running": 0, "waiting": 0}  # cancelled streams freed theirs
    assert data["exit_code"] == 0 and data["shm_left"] == [] and data["processes_left"] == []
    assert data["probes"]["unexpected"] == [] and data["probes"]["n"] > 30
    assert [json.loads(f.read_text()) for f in tmp_path.glob("soak-*.json")] == [data]
    host, port = urlsplit(data["url"]).hostname, urlsplit(data["url"]).port
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()

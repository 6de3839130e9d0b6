"""Soak: `ladder serve` under N clients for M minutes, a rank killed every K minutes, and every
request accounted for.

Each client loops until the time is up, taking in turn (by weight) a streamed chat, a plain
completion, a stream it drops after a few chunks (cancelled), or a hostile request from
`bench.hostile`; after a 503 it waits the Retry-After it was given, as a client should. Every
K minutes one of the serving group's ShardWorker processes (rank 0 and the last rank in turn,
by start order) gets SIGKILL; Serve replaces the replica.

Each request ends as one of:
  completed   a 200 with the whole answer (a stream: a finish reason, then [DONE])
  refused     a hostile request answered with the 4xx it should get
  busy        a 503 with Retry-After and an OpenAI error body saying the server is at capacity
              (more clients than slots and queue: the client retries when told)
  failed      a clear failure: a 503 with Retry-After and an OpenAI error body (the group is
              being replaced), or a stream whose error event came before its [DONE]
  cancelled   dropped by the client on purpose
  lost        anything else: no answer, a stream cut without an error event, a 500, a 503
              without Retry-After, a 4xx for a good request
Before the load, every probe of `bench.hostile` runs once, each followed by a small request
(timed). After Ctrl-C to `ladder serve`: what it left in /dev/shm and in the process table (its
session). Targets: 0 lost, no probe answered otherwise than it should, the request after a
probe served within 2 s, nothing left. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import secrets
import signal
import tempfile
import time
from pathlib import Path

from bench.hostile import probes, send
from bench.serve_proc import ladder_serve, session_processes, wait_ready, write_config
from bench.table import table
from bench.timed import bench_main, emit, log
from ladder.procs import alive

KINDS = {"stream": 55, "plain": 25, "cancel": 12, "hostile": 8}  # weights
TOPICS = ["the sea", "volcanoes", "bread", "prime numbers", "owls", "rain", "chess", "tea"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--kill-every", type=float, default=2.0,
                   help="minutes between rank kills (0: none)")
    p.add_argument("--model", default="smollm2", help="the served checkpoint")
    p.add_argument("--n-slots", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48, help="the most a request asks for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON line to DIR/soak-<time>.json")


class Soak:
    def __init__(self, url: str, key: str, model: str, a: argparse.Namespace) -> None:
        self.url, self.key, self.model, self.a = url, key, model, a
        self.rng = random.Random(a.seed)
        self.probes = probes(model)
        self.outcomes: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        self.lost: list[str] = []
        self.completed_at: list[float] = []  # when completed requests started
        self.kills: list[dict] = []

    def count(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[kind][outcome] = self.outcomes[kind].get(outcome, 0) + 1
        if outcome == "lost":
            self.lost.append(f"{kind}: {detail}"[:300])

    async def client(self, session, deadline: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            t0 = time.monotonic()
            try:
                outcome, detail, wait = await getattr(self, kind)(session)
            except Exception as e:  # noqa: BLE001 - no answer at all: lost
                outcome, detail, wait = "lost", f"{type(e).__name__}: {e}", 1.0
            self.count(kind, outcome, detail)
            if outcome == "completed":
                self.completed_at.append(t0)
            await asyncio.sleep(wait)

    def body(self, stream: bool) -> dict:
        r = self.rng
        return {"model": self.model, "stream": stream,
                "messages": [{"role": "user", "content": f"Tell me about {r.choice(TOPICS)}."}],
                "max_tokens": r.randint(4, self.a.max_tokens), "n": r.choice([1, 1, 1, 2]),
                "temperature": r.choice([0.0, 0.7, 1.0])}

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    async def plain(self, session):
        async with session.post(self.url + "/v1/chat/completions", json=self.body(False),
                                headers=self.headers) as r:
            text = await r.text()
            if r.status == 200:
                ok = len(json.loads(text)["choices"]) > 0
                return ("completed" if ok else "lost"), text[:200], 0.0
            return self.refusal(r.status, r.headers, text)

    async def stream(self, session, drop_after: int | None = None):
        async with session.post(self.url + "/v1/chat/completions", json=self.body(True),
                                headers=self.headers) as r:
            if r.status != 200:
                return self.refusal(r.status, r.headers, await r.text())
            chunks, finished, error = 0, False, None
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    if error:
                        return "failed", error, 1.0
                    return ("completed" if finished else "lost"), "no finish reason", 0.0
                obj = json.loads(data)
                if "error" in obj:
                    error = obj["error"]["message"]
                    continue
                chunks += 1
                finished = finished or any(c.get("finish_reason") for c in obj["choices"])
                if drop_after is not None and chunks >= drop_after:
                    return "cancelled", "", 0.0  # leaving the block drops the connection
            return "lost", f"the stream ended without [DONE] after {chunks} chunks", 0.0

    async def cancel(self, session):
        return await self.stream(session, drop_after=self.rng.randint(1, 3))

    async def hostile(self, session):
        probe = self.rng.choice(self.probes)
        status, body, headers = await asyncio.to_thread(send, self.url, probe, self.key)
        if status in probe.statuses and status < 500:
            return ("completed" if status == 200 else "refused"), "", 0.0
        out = self.refusal(status, headers, body.decode(errors="replace"))
        if out[0] in ("busy", "failed"):
            return out
        return "lost", f"{probe.name}: {status} {body[:120]!r}", 0.0

    @staticmethod
    def refusal(status: int, headers, text: str):
        """A non-200 answer to a good request: failed (clearly) or lost."""
        retry = headers.get("Retry-After") or headers.get("retry-after")
        if status == 503 and retry:
            try:
                err = json.loads(text)["error"]
                ok = isinstance(err["message"], str)
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                outcome = "busy" if err.get("code") == "overloaded" else "failed"
                return outcome, "", min(float(retry), 10.0)
        return "lost", f"{status} {text[:160]}", 1.0

    def probe_all(self) -> dict:
        """Before the load: every hostile probe once, each followed by a small request (the
        issue's target: it succeeds within 2 s of the probe's answer)."""
        import urllib.request
        bad, followups = [], []
        small = json.dumps({"model": self.model, "prompt": "Hi", "max_tokens": 2}).encode()
        for probe in self.probes:
            status, body, _ = send(self.url, probe, self.key)
            if status >= 500 or status not in probe.statuses:
                bad.append(f"{probe.name}: {status} {body[:120]!r}")
            t0 = time.monotonic()
            req = urllib.request.Request(self.url + "/v1/completions", data=small, headers={
                **self.headers, "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                ok = r.status == 200
            followups.append(time.monotonic() - t0)
            if not ok:
                bad.append(f"{probe.name}: the next request got {r.status}")
        return {"n": len(self.probes), "unexpected": bad,
                "max_followup_s": round(max(followups), 3),
                "median_followup_s": round(sorted(followups)[len(followups) // 2], 3)}

    async def killer(self, pid: int, deadline: float) -> None:
        every = self.a.kill_every * 60
        for n in itertools.count():
            at = self.t0 + (n + 1) * every  # each kill leaves the group an interval to recover
            if every <= 0 or at + every > deadline + 1e-3:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            workers = await self.workers(pid, deadline)
            if not workers:
                return
            victim = workers[-2:][n % 2] if len(workers) > 1 else workers[0]
            os.kill(victim, signal.SIGKILL)
            self.kills.append({"at_s": round(time.monotonic() - self.t0, 1), "pid": victim,
                               "t": time.monotonic()})
            log(f"killed ShardWorker pid {victim}")

    @staticmethod
    async def workers(pid: int, deadline: float) -> list[int]:
        """The group's ShardWorker processes, once there are some (a group being replaced has
        none for a while), or [] at the deadline."""
        while time.monotonic() < deadline:
            found = session_processes(pid, title="ray::ShardWorker")
            if found:
                return found
            await asyncio.sleep(0.5)
        return []

    async def run(self, pid: int) -> None:
        import aiohttp
        self.t0 = time.monotonic()
        deadline = self.t0 + self.a.minutes * 60
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(self.killer(pid, deadline),
                                 *(self.client(session, deadline)
                                   for _ in range(self.a.clients)))
        for k in self.kills:  # recovery: the first request after the kill that completed
            t = k.pop("t", None)
            after = [c for c in self.completed_at if t is not None and c > t]
            k["recovered_s"] = round(min(after) - t, 1) if after else None


def slots_after(url: str, key: str) -> dict:
    import urllib.request
    req = urllib.request.Request(url + "/stats", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        st = json.loads(r.read())
    return {"running": st["running"], "waiting": st["waiting"]}


def stragglers(pid: int, started: list[int], grace_s: float) -> list[int]:
    """What `ladder serve` started and is still running `grace_s` after it exited."""
    deadline = time.monotonic() + grace_s
    while True:
        left = sorted(set(session_processes(pid)) | {p for p in started if alive(p)})
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def orphaned(names: set[str]) -> list[str]:
    """Of /dev/shm's `names`, those no live process maps or holds open: what a dead process
    left. One still in use belongs to a live process (the machine's others too: a test run
    beside this one makes semaphores of its own), and ours among those are in processes_left.
    Matched by inode: glibc's sem_open maps a temporary name, then links the real one to it."""
    mapped: set[int] = set()  # inodes of /dev/shm files (one file system)
    opened: set[tuple[int, int]] = set()  # (device, inode) of every open file
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped |= {int(ln.split()[4]) for ln in f if "/dev/shm/" in ln}
            fds = f"/proc/{pid}/fd"
            for fd in os.listdir(fds):
                st = os.stat(os.path.join(fds, fd))
                opened.add((st.st_dev, st.st_ino))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    left = []
    for n in sorted(names):
        try:
            st = os.stat(f"/dev/shm/{n}")
            if st.st_ino not in mapped and (st.st_dev, st.st_ino) not in opened:
                left.append(n)
        except OSError:  # removed meanwhile
            pass
    return left


def run(a: argparse.Namespace) -> int:
    from ladder.links.factory import free_port
    key, port = "sk-soak-" + secrets.token_hex(8), free_port()
    model_name = Path(a.model).name if a.model != "smollm2" else "smollm2"
    before = shm()
    with tempfile.TemporaryDirectory(prefix="soak") as tmp:
        cfg = write_config(Path(tmp), port, model=a.model, model_name=model_name,
                           api_keys=[key], n_slots=a.n_slots, max_seq=512,
                           residual="ladder:24-29" if a.model == "smollm2" else "standard")
        with ladder_serve(cfg) as proc:
            log(f"ladder serve is up in {wait_ready(proc, 300):.0f} s")
            url = f"http://127.0.0.1:{port}"
            soak = Soak(url, key, model_name, a)
            probed = soak.probe_all()
            log(f"{probed['n']} hostile probes: {len(probed['unexpected'])} unexpected, the "
                f"next request at most {probed['max_followup_s']} s later")
            asyncio.run(soak.run(proc.pid))
            time.sleep(3)  # the last cancellations reach the leader
            slots = slots_after(url, key)
            started = session_processes(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=120)
            except Exception:  # noqa: BLE001 - reported, then ended by ladder_serve
                code = None
            left = stragglers(proc.pid, started, grace_s=20)
    shm_left = orphaned(shm() - before)
    counts = {o: sum(v.get(o, 0) for v in soak.outcomes.values())
              for o in ("completed", "refused", "busy", "failed", "cancelled", "lost")}
    result = {"bench": "soak", "url": url, "clients": a.clients, "minutes": a.minutes,
              "kill_every_min": a.kill_every, "model": model_name, "requests": counts,
              "by_kind": soak.outcomes, "lost_examples": soak.lost[:20], "kills": soak.kills,
              "probes": probed,
              "slots_after": slots, "exit_code": code, "shm_left": shm_left,
              "processes_left": left,
              "targets": {"lost": 0, "left": 0, "probes_unexpected": 0, "max_followup_s": 2.0}}
    rows = [[k, *(v.get(o, 0) for o in counts)] for k, v in soak.outcomes.items()]
    print(table(f"Soak: {a.clients} clients, {a.minutes} min, a rank killed every "
                f"{a.kill_every} min", ["kind", *counts], rows + [["all", *counts.values()]]))
    print(table("Kills", ["at s", "pid", "recovered s"],
                [[k["at_s"], k["pid"], k.get("recovered_s")] for k in soak.kills]))
    print(f"left after shutdown: /dev/shm {shm_left or 'nothing'}; processes "
          f"{left or 'none'}; ladder serve exit code {code}")
    print(f"hostile probes: {probed['n']}, unexpected answers {len(probed['unexpected'])}, "
          f"the next request {probed['median_followup_s']} s after (median), "
          f"{probed['max_followup_s']} s at most")
    emit(result, a.out, "soak")
    ok = counts["lost"] == 0 and not shm_left and not left and not probed["unexpected"]
    return 0 if ok else 1


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())

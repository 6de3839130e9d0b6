"""An adapted model, served: `ladder serve` on an adapted folder answers the README's example
prompt, reports its plan on `/v1/models`, and gives the same greedy tokens at TP=2 as at TP=1.

Serves the folder with `ladder serve` (deploy/smollm2.yaml with the folder as its model, its
own local Ray instance, token authentication on), asks the README's prompt through the official
`openai` client (greedy), and judges the answer by a stated rule: it must say that work runs at
the same time (simultaneous / concurrent / in parallel / at the same time) on several units
(processors / cores / threads / tasks / computers / machines). The parent's answer to the same
prompt, greedy on the same engine, is shown beside it. Then the folder's greedy tokens at TP=1
and TP=2 (shared memory) on a local group, without Ray.

    python -m bench.adapted_serve --model bench/out/adapt/ladder_24-29
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import urllib.request
from pathlib import Path

from adapt.evaluate import README_PROMPT

DEFAULT_MODEL = Path(__file__).resolve().parent / "out" / "adapt" / "ladder_24-29"
_AT_ONCE = re.compile(r"\b(simultaneous|concurren|in parallel|at the same time)")
_UNITS = re.compile(r"\b(processor|core|thread|task|computer|machine)")


def answers_readme_prompt(text: str) -> bool:
    """The rule for "What is parallel computing?": work at once on several units."""
    t = text.lower()
    return bool(_AT_ONCE.search(t) and _UNITS.search(t))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="an adapted folder")
    p.add_argument("--prompt", default=README_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="plain completion, no chat template")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json-dir", default=None, help="also write the JSON line here")


def served(model: Path, prompt: str, max_tokens: int, chat: bool,
           startup_timeout: float = 300.0) -> dict:
    """`ladder serve` on the folder: its /v1/models entry and its greedy answer to the prompt."""
    from openai import OpenAI

    from bench.serve_proc import ladder_serve, wait_ready, write_config
    from ladder.links.factory import free_port
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="adapted-serve-") as tmp:
        cfg = write_config(Path(tmp), port, model=str(model.resolve()), model_name="adapted",
                           n_slots=2, max_seq=512, api_keys=[],
                           residual=None)  # None: the folder's own plan
        with ladder_serve(cfg) as proc:
            ready_s = wait_ready(proc, startup_timeout)
            url = f"http://127.0.0.1:{port}/v1"
            with urllib.request.urlopen(url + "/models", timeout=30) as r:
                entry = json.loads(r.read())["data"][0]
            c = OpenAI(base_url=url, api_key="none", max_retries=0)
            if chat:
                text = c.chat.completions.create(
                    model="adapted", messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens, temperature=0).choices[0].message.content
            else:
                text = c.completions.create(model="adapted", prompt=prompt, max_tokens=max_tokens,
                                            temperature=0).choices[0].text
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
    return {"ready_s": ready_s, "model_entry": entry, "text": text, "exit_code": code}


def local_tokens(model: str, prompt: str, max_tokens: int, chat: bool, tp: int,
                 residual: str | None = None) -> tuple[list[int], str]:
    """Greedy tokens and text of a local group (no Ray) at TP=tp."""
    from ladder.engine.local import LocalTPGroup
    from ladder.engine.sampling import SamplingParams
    from ladder.options import GroupOptions
    with LocalTPGroup(GroupOptions(model=model, tp=tp, residual=residual, n_slots=1,
                                   max_seq=512, threads=1 if tp > 1 else 2)) as g:
        ids = g.encode(prompt, chat=chat)
        out = g.generate([ids], [SamplingParams(max_tokens=max_tokens, temperature=0)])[0]
    return list(out["tokens"]), out["text"]


def check(model: Path, prompt: str, max_tokens: int = 64, chat: bool = True,
          startup_timeout: float = 300.0) -> dict:
    conf = json.loads((model / "config.json").read_text())
    parent = (conf.get("ladder_adapted") or {}).get("parent")
    srv = served(model, prompt, max_tokens, chat, startup_timeout)
    tp1, text1 = local_tokens(str(model), prompt, max_tokens, chat, 1)
    tp2, _ = local_tokens(str(model), prompt, max_tokens, chat, 2)
    parent_text = (local_tokens(parent, prompt, max_tokens, chat, 1, residual="standard")[1]
                   if parent else None)
    return {"model": str(model), "prompt": prompt, "chat": chat, "max_tokens": max_tokens,
            "served": srv, "served_is_tp1": srv["text"] == text1, "tp1_tokens": tp1,
            "tp2_tokens": tp2, "tp2_equals_tp1": tp1 == tp2,
            "answer_correct": answers_readme_prompt(srv["text"]),
            "parent": parent, "parent_text": parent_text,
            "parent_correct": answers_readme_prompt(parent_text) if parent_text else None}


def run(args: argparse.Namespace) -> int:
    from bench.table import table
    from bench.timed import emit
    if not (args.model / "config.json").is_file():
        print(f"{args.model}: no adapted folder (run `ladder adapt ... --out {args.model}` or "
              "`python -m bench.adapt_curve` first)", file=sys.stderr)
        return 2
    r = check(args.model, args.prompt, args.max_tokens, not args.no_chat, args.startup_timeout)
    e = r["served"]["model_entry"]
    print(f"prompt: {r['prompt']!r}\n\nadapted ({e.get('residual_plan')}, served):\n"
          f"  {r['served']['text']!r}\n\nparent ({r['parent']}, standard):\n"
          f"  {r['parent_text']!r}\n")
    print(table("adapted model served by `ladder serve`",
                ["residual_plan", "adapted", "ready s", "answer correct", "parent correct",
                 "served = TP=1", "TP=2 = TP=1", "tokens"],
                [[e.get("residual_plan"), e.get("adapted"), r["served"]["ready_s"],
                  r["answer_correct"], r["parent_correct"], r["served_is_tp1"],
                  r["tp2_equals_tp1"], len(r["tp1_tokens"])]]))
    emit({"bench": "adapted_serve", **r}, args.json_dir, "adapted_serve")
    ok = r["answer_correct"] and r["tp2_equals_tp1"] and e.get("adapted") is True
    return 0 if ok else 1


def main() -> int:
    from bench.timed import bench_main
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())

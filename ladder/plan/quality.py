"""What a plan costs in quality, where a recovery curve says: `--quality FILE`.

FILE is either the JSON line `python -m bench.adapt_curve` prints (and writes with `--json-dir`):

    {"bench": "adapt_curve", "model": "smollm2", ...,
     "curves": {"ladder:24-29": {"points": [{"step": 0, "tokens": 0, "ppl_ratio": 1.197, ...},
                                            ..., {"step": 50, "tokens": 51200, "ppl_ratio": 1.031}]}}}

or a plain table: {"model": "...", "plans": {"ladder:24-29": {"ppl_ratio": 1.03}, ...}}.
A row gets `quality` when its plan is the same set of layers as a curve's (specs are compared
after parsing against the planned model's layer count): from a curve, the held-out perplexity
ratio to the standard model after its last training step (`ppl_ratio`), before any training
(`ppl_ratio_zero_shot`, where step 0 was evaluated) and the training tokens it took; always the
model the curve was measured on, which need not be the planned one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ladder.model.config import ConfigError, ResidualPlan


def load(path: str) -> dict[str, Any]:
    """The file's object: a single JSON value, or the last line of a JSON-lines file."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--quality {path}: cannot read it ({e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for candidate in (text, lines[-1] if lines else ""):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and ("curves" in data or "plans" in data):
            return data
    raise ConfigError(f"--quality {path}: not a bench.adapt_curve result or a "
                      "{\"plans\": {...}} table")


def by_plan(data: dict[str, Any], n_layers: int, source: str) -> dict[ResidualPlan, dict]:
    """Quality figures keyed by the plan they describe, for a model of `n_layers`; a curve whose
    layers this model does not have is left out."""
    model = data.get("model")
    entries = data.get("curves") or data.get("plans") or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"--quality {source}: \"curves\" / \"plans\" must be an object")
    out: dict[ResidualPlan, dict] = {}
    for spec, entry in entries.items():
        try:
            plan = ResidualPlan.parse(str(spec), n_layers)
        except ConfigError:
            continue
        q = _from_curve(entry) if "curves" in data else _from_table(entry)
        if q is not None:
            out[plan] = {**q, "model": model}
    return out


def _from_curve(curve: Any) -> dict | None:
    points = curve.get("points") if isinstance(curve, dict) else None
    if not points:
        return None
    last = points[-1]
    q = {"ppl_ratio": last.get("ppl_ratio"), "train_tokens": last.get("tokens")}
    if points[0].get("step") == 0:
        q["ppl_ratio_zero_shot"] = points[0].get("ppl_ratio")
    return q


def _from_table(entry: Any) -> dict | None:
    if not isinstance(entry, dict):
        return None
    return {k: v for k, v in entry.items() if isinstance(v, (int, float, str))}


def attach(rows: list[dict], plans: dict[str, ResidualPlan],
           quality: dict[ResidualPlan, dict]) -> None:
    """Add `quality` to the rows whose plan (by label) a curve describes."""
    for r in rows:
        q = quality.get(plans[r["plan"]])
        if q is not None:
            r["quality"] = q

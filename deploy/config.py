"""What a replica serves (`ServerConfig`, the `args` of a Serve config's application), its API
keys, and the Serve deployment options derived from it.

Every setting is checked when the config is built, with a message that names the field, so a
bad YAML fails `ladder serve` (or `serve run`) before any cluster starts. API keys may sit in
the YAML (`api_keys`), in a file (`api_keys_file`, one key per line) or in an environment
variable (`api_keys_env`, keys separated by commas or whitespace); `resolve_keys` reads the
last two where the application is built, so a replica receives the keys, not where they live.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from actors.group import LINK_LABEL, STRATEGIES
from ladder.model.config import ResidualPlan
from ladder.options import GroupOptions

# Serve's own deployment settings, accepted beside the ServerConfig fields in `args`
DEPLOY_KEYS = ("num_replicas", "autoscaling_config", "max_ongoing_requests",
               "max_queued_requests", "health_check_period_s", "health_check_timeout_s",
               "graceful_shutdown_timeout_s")
REPLICA_MEMORY = 256 * 2**20  # bytes reserved for the replica process (bundle 0)


@dataclass(kw_only=True)
class ServerConfig:
    model: str = "smollm2"  # a checkpoint: smollm2, a folder or a .gguf
    model_name: str = "smollm2"  # the id clients send as `model`
    tp: int = 2
    residual: str | None = "ladder:24-29"  # None: the checkpoint's own plan, else standard
    dtype: str = "float32"
    device: str = "cpu"
    comm: str = "auto"
    n_slots: int = 16  # sequences at once at most (vLLM's max_num_seqs)
    max_seq: int = 2048
    # the KV cache per rank: bytes, or a fraction of the memory free after the model loads,
    # or (both 0) room for n_slots sequences of max_seq tokens; blocks of block_size tokens
    kv_cache_bytes: int = 0
    kv_cache_fraction: float = 0.0
    block_size: int = 16
    prefix_caching: bool = True  # prompts that start alike share their full blocks
    max_num_batched_tokens: int = 24  # a step's tokens while others decode (0: no chunking)
    threads: int = 1  # torch threads per rank
    head_split: str = "groups"  # groups | even: how attention heads are split over the ranks
    strategy: str = "PACK"  # placement of the ranks (the deployment's placement group)
    api_keys: list[str] = field(default_factory=list)  # none anywhere: no authentication
    api_keys_file: str = ""  # a file of keys, one a line (# comments and blank lines skipped)
    api_keys_env: str = ""  # an environment variable holding keys (comma or space separated)
    queue_limit: int = 32  # generations waiting for a slot, past which: 503 + Retry-After
    retry_after_s: int = 1
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    max_body_bytes: int = 4 * 2**20  # a larger request body: 413, before it is parsed
    max_prompt_chars: int = 0  # 0: what the context could hold at the longest token's length
    metrics: bool = True  # Prometheus series through Ray's metrics agents
    interconnect: str = ""  # the link's label when the launch knows it (e.g. a shaped link)
    link: str = ""  # ranks only on nodes of this launcher link profile (Ray node label)
    health_timeout_s: float = 10.0
    fault_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(ServerConfig)
        for f in fields(self):
            value = getattr(self, f.name)
            if not _fits(value, hints[f.name]):
                raise ValueError(f"{f.name}: {value!r} is not a {_type_name(hints[f.name])}")
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ValueError("api_keys: a key must be a non-empty string without surrounding "
                             "spaces")
        positive = ("tp", "n_slots", "max_seq", "block_size", "threads", "default_max_tokens",
                    "max_body_bytes", "health_timeout_s", "fault_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("queue_limit", "retry_after_s", "max_prompt_chars", "kv_cache_bytes",
                     "max_num_batched_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.kv_cache_fraction < 1:
            raise ValueError(f"kv_cache_fraction: must be in [0, 1), got "
                             f"{self.kv_cache_fraction!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.residual is not None:  # the syntax here; the layers against the checkpoint's
            ResidualPlan.parse(self.residual, n_layers=1 << 16)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ServerConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown server settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    def resolve_keys(self) -> "ServerConfig":
        """This config with the keys of `api_keys_file` and `api_keys_env` added to `api_keys`
        (and those two cleared). Raises ValueError naming the setting when one cannot be read
        or holds no key."""
        keys = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file).expanduser()
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"api_keys_file: cannot read {path}: {e}") from None
            got = [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
            if not got:
                raise ValueError(f"api_keys_file: {path} holds no key")
            keys += got
        if self.api_keys_env:
            got = os.environ.get(self.api_keys_env, "").replace(",", " ").split()
            if not got:
                raise ValueError(f"api_keys_env: the environment variable {self.api_keys_env} "
                                 "is unset or empty")
            keys += got
        return replace(self, api_keys=list(dict.fromkeys(keys)), api_keys_file="",
                       api_keys_env="")

    def group_options(self) -> GroupOptions:
        """The group's options: every setting GroupOptions has under the same name (one
        mapping, so a new option needs no line here)."""
        shared = {f.name for f in fields(GroupOptions)} & {f.name for f in fields(self)}
        return GroupOptions(**{k: getattr(self, k) for k in shared})


def split_args(args: dict | None) -> tuple[ServerConfig, dict]:
    """An application's `args` -> (its ServerConfig, Serve's deployment settings)."""
    args = dict(args or {})
    dep = {k: args.pop(k) for k in DEPLOY_KEYS if k in args}
    return ServerConfig.from_dict(args), dep


def deployment_options(cfg: ServerConfig, **overrides) -> dict:
    """Gang scheduling: bundle 0 for the replica itself, one bundle per rank. The replica
    refuses work past `n_slots + queue_limit` itself (503 with an OpenAI-style body and
    Retry-After); Serve's own queue limits sit above that as a safety net."""
    rank = {"CPU": float(cfg.threads)}
    if cfg.device == "cuda":
        rank = {"CPU": 1.0, "GPU": 1.0}
    # the replica only relays HTTP and token events: it reserves memory, not a core, so that
    # a TP=2 group fits a 2-core machine
    replica = {"memory": REPLICA_MEMORY}
    opts = {
        "ray_actor_options": {"num_cpus": 0, "memory": REPLICA_MEMORY},
        "placement_group_bundles": [replica] + [dict(rank) for _ in range(cfg.tp)],
        "placement_group_strategy": cfg.strategy,
        # `link`: the ranks' bundles only on nodes the launcher labelled with that profile
        **({"placement_group_bundle_label_selector":
            [{}] + [{LINK_LABEL: cfg.link}] * cfg.tp} if cfg.link else {}),
        "max_ongoing_requests": cfg.n_slots + cfg.queue_limit + 8,
        "max_queued_requests": 4 * (cfg.n_slots + cfg.queue_limit),
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "health_check_period_s": 5.0,
        "health_check_timeout_s": cfg.health_timeout_s + 10,
        "graceful_shutdown_timeout_s": 30.0,
    }
    opts.update(overrides)
    if "autoscaling_config" in opts:
        opts.pop("num_replicas", None)
    return opts


def _fits(value, hint) -> bool:
    """`value` is of the annotated type (bools are not numbers; ints are floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean",
            list[str]: "list of strings"}.get(hint, str(hint).replace("typing.", ""))

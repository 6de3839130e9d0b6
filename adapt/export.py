"""The adapted model as a Hugging Face folder that every loader of the project reads.

The parent's weights with the trained tensors put back, under the standard Llama names (so
transformers' `LlamaForCausalLM.from_pretrained` reads them too), the parent's tokenizer and chat
template, and in config.json the residual plan the weights were trained for (`ladder_layers`,
which the loaders then run, refusing a contradicting `--residual`) and what the run did
(`ladder_adapted`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ladder.loaders import load_shard, open_checkpoint
from ladder.loaders.hf import LADDER_SCHEDULE, write_folder
from ladder.loaders.shard import unshard
from ladder.model.tp import ShardSpec


def write_adapted(o, state_path: Path, metrics: dict) -> Path:
    """`o`: the run's AdaptOptions; `state_path`: its final checkpoint's state.pt."""
    ckpt = open_checkpoint(o.model)
    cfg = ckpt.config
    plan = ckpt.plan(o.residual)
    state = load_shard(ckpt, ShardSpec.make(cfg, 0, 1), torch.float32)
    trained = torch.load(state_path, map_location="cpu", weights_only=True)["params"]
    unknown = set(trained) - set(state)
    if unknown:
        raise ValueError(f"{state_path}: tensors the model does not have: {sorted(unknown)}")
    state.update(trained)
    record = {"parent": o.model, "steps": o.steps, "tokens": metrics.get("tokens"),
              "trainable": o.trainable, "ce_weight": o.ce_weight, "lr": o.lr, "seed": o.seed,
              "data": o.data, "held_out_ppl": metrics.get("ppl"),
              "parent_ppl": metrics.get("parent_ppl"), "ppl_ratio": metrics.get("ppl_ratio"),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    extra = {"ladder_residual": plan.spec(cfg.n_layers),
             "ladder_layers": sorted(plan.ladder_layers), "ladder_adapted": record,
             "ladder_schedule": LADDER_SCHEDULE}
    return write_folder(o.out, cfg, unshard(state, cfg), tokenizer=ckpt.tokenizer(),
                        extra=extra, force=o.force)

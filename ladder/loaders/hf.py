"""Hugging Face folders: `config.json` plus one or more `*.safetensors` files.

Sharded folders list their tensors in `model.safetensors.index.json`. Every file is opened (memory
mapped, header parsed) up front, so a truncated or missing shard fails at open time with its name;
tensors are then read slice by slice through `safe_open(...).get_slice`, which touches only the
requested bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ladder.loaders.base import Checkpoint, CheckpointError, Range, check_range
from ladder.model.config import ConfigError, ModelConfig, ResidualPlan
from ladder.private import check_replaceable, remove
from ladder.tokenizer import Tokenizer

INDEX_NAME = "model.safetensors.index.json"
# what a partial ladder's first module reads, by the version adapted folders record: 2, the
# stream without the module before it (Transformer.hidden); folders before it read it with
LADDER_SCHEDULE = 2
EXPORT_MARK = ".ladder-export"  # in every folder write_folder makes: a later write may replace it


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from None


def _recorded_plan(hf: dict[str, Any], config: ModelConfig, source: Path) -> ResidualPlan | None:
    """`ladder_layers` of an adapted folder's config.json (see `write_folder`), or of the
    paper's own `llamaLadder` models (ladder-residual-inference's hf_modeling_utils), or None."""
    layers = hf.get("ladder_layers")
    if layers is None:
        return None
    n = config.n_layers
    if str(hf.get("model_type", "")).lower() == "llamaladder" and isinstance(layers, int) \
            and 0 < layers <= n:  # the paper's own config: the last N layers
        layers = list(range(n - layers, n))
    if (hf.get("ladder_adapted") is not None and hf.get("ladder_schedule") != LADDER_SCHEDULE
            and isinstance(layers, list) and sorted(layers) != list(range(n))):
        raise CheckpointError(f"{source}: adapted for the partial ladder schedule before "
                              f"ladder_schedule {LADDER_SCHEDULE} (its first ladder attention "
                              "read the output of the MLP before it; now it reads without it, as "
                              "the paper's models do): run `ladder adapt` again")
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(i, int) and 0 <= i < n for i in layers)):
        raise CheckpointError(f"{source}: ladder_layers must be a non-empty list of layer "
                              f"indices in 0..{n - 1}, got {layers!r}")
    return ResidualPlan("ladder", frozenset(layers))


class SafetensorsCheckpoint(Checkpoint):
    """A folder in Hugging Face layout (the names are already ours to read)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json in this folder "
                                  "(expected a Hugging Face model folder)")
        self.hf_config = _read_json(config_path)
        try:
            self.config = self._read_config(self.hf_config, config_path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.recorded_plan = self._read_plan(self.hf_config, config_path)
        self.adapted = self.hf_config.get("ladder_adapted")

        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.path / f).is_file():
                    raise CheckpointError(f"{index_path}: names shard {f!r}, which is missing "
                                          f"from {self.path}")
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files (and no {INDEX_NAME})")
            weight_map = None

        self._handles = {f: self._open(self.path / f) for f in files}
        # Trust the headers over the index: a tensor the index promises but its shard lacks is
        # reported as missing, not as a crash at read time.
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for key in h.keys():
                if weight_map is None or weight_map.get(key) == f:
                    self._where[key] = f

    def _read_config(self, hf: dict[str, Any], source: Path) -> ModelConfig:
        return ModelConfig.from_hf(hf, source=str(source))

    def _read_plan(self, hf: dict[str, Any], source: Path) -> ResidualPlan | None:
        return _recorded_plan(hf, self.config, source)

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file "
                                  f"(truncated or corrupt?): {e}") from None

    def has(self, name: str) -> bool:
        return name in self._where

    def location(self, name: str) -> Path:
        f = self._where.get(name)
        return self.path / f if f else self.path

    def _slice(self, name: str):
        if name not in self._where:
            raise self._missing(name)
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        sl = self._slice(name)
        shape = sl.get_shape()
        where = self.location(name)
        r0, r1 = check_range(where, name, rows, shape[0], "rows")
        try:
            if len(shape) == 1:
                if cols is not None:
                    raise CheckpointError(f"{where}: tensor {name!r} is 1-D; no column range")
                t = sl[r0:r1]
            else:
                c0, c1 = check_range(where, name, cols, shape[1], "cols")
                t = sl[r0:r1, c0:c1]
        except SafetensorError as e:
            raise CheckpointError(f"{where}: cannot read tensor {name!r}: {e}") from None
        return t.to(torch.float32)

    def tokenizer(self) -> Tokenizer:
        extra = list(self.config.eos_token_ids)
        gen = self.path / "generation_config.json"
        if gen.is_file():
            eos = _read_json(gen).get("eos_token_id")
            extra += eos if isinstance(eos, list) else [] if eos is None else [eos]
        return Tokenizer.from_folder(self.path, extra_eos_token_ids=extra)


def write_folder(dest: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor], *,
                 tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None,
                 force: bool = False) -> Path:
    """Write a Hugging Face Llama folder that this module (and transformers'
    `LlamaForCausalLM.from_pretrained`) reads: config.json with `extra` keys added (e.g. the
    residual plan an adapted model runs), model.safetensors (float32, Hugging Face names) and
    the tokenizer files with the chat template. Written beside `dest`, then moved into place.
    An existing `dest` is replaced only if this function wrote it (EXPORT_MARK), it is empty, or
    `force`; a link never (ladder.private.check_replaceable raises UnsafePath)."""
    import time

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    for folder in (dest, tmp):
        check_replaceable(folder, (EXPORT_MARK,), force=force, what=str(folder))
    remove(tmp)
    tmp.mkdir(parents=True)
    (tmp / EXPORT_MARK).write_text(json.dumps({"written_by": "ladder-serve",
                                               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    eos = list(config.eos_token_ids)
    hf = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None), hidden_act="silu",
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"],
    ).to_dict()
    family = config.family  # the same fields, read back as the family the weights are
    hf.update({"torch_dtype": "float32", "rope_theta": config.rope_theta, "model_type": family,
               "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                  "mistral": "MistralForCausalLM"}[family]],
               "sliding_window": config.sliding_window, **(extra or {})})
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(tmp)
    remove(dest)
    tmp.rename(dest)
    return dest

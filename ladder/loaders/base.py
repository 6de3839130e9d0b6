"""The checkpoint interface every weight format implements, and its one error type.

A `Checkpoint` speaks Hugging Face Llama tensor names and layouts whatever the file holds, so
that sharding (`ladder.loaders.shard`) is written once. `read` takes row and column ranges
because each tensor-parallel rank must read only its own slices from disk, never the whole model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ladder.model.config import ConfigError, ModelConfig, ResidualPlan

if TYPE_CHECKING:
    from ladder.tokenizer import Tokenizer

Range = tuple[int, int]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


class Checkpoint(ABC):
    """Weights and config of one Llama-family model, read lazily by Hugging Face tensor name."""

    path: Path  # the file or folder it was opened from
    config: ModelConfig
    recorded_plan: ResidualPlan | None = None  # the plan an adapted checkpoint was trained for
    adapted: dict | None = None  # what `ladder adapt` recorded (parent, steps, tokens, ...)

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether the checkpoint holds tensor `name` (Hugging Face naming)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` in Hugging Face layout ([out, in] or [n]), without reading it."""

    @abstractmethod
    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        """float32 tensor `name`, only rows [lo, hi) and columns [lo, hi) where given.

        Only the requested part is read from disk. `cols` applies to 2-D tensors; for a 1-D
        tensor `rows` slices its only dimension.
        """

    @abstractmethod
    def tokenizer(self) -> "Tokenizer":
        """The model's tokenizer (with its chat template where the checkpoint has one)."""

    def plan(self, residual: str | None = None) -> ResidualPlan:
        """The residual plan to run. A checkpoint that records its own plan (one `ladder adapt`
        wrote) runs that plan: `residual` may repeat it, and anything else is refused, since
        the weights were trained for that schedule. Otherwise `residual` (default standard)."""
        n = self.config.n_layers
        if self.recorded_plan is None:
            return ResidualPlan.parse(residual or "standard", n)
        own = self.recorded_plan.spec(n)
        if residual is not None:
            try:
                asked = ResidualPlan.parse(residual, n)
            except ConfigError as e:
                raise CheckpointError(f"{self.path}: {e}") from None
            if asked != self.recorded_plan:
                raise CheckpointError(
                    f"{self.path}: residual {residual!r} contradicts the checkpoint, whose weights "
                    f"were adapted to run {own!r} (config.json ladder_layers); leave the residual "
                    f"out or give {own!r}")
        return self.recorded_plan

    def location(self, name: str) -> Path:
        """The file holding tensor `name`, for error messages."""
        return self.path

    def _missing(self, name: str, detail: str = "") -> CheckpointError:
        return CheckpointError(f"{self.location(name)}: missing tensor {name!r}{detail}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def check_range(where: Path, name: str, r: Range | None, n: int, what: str) -> Range:
    """`r` as a concrete [lo, hi) within [0, n), or a CheckpointError naming the tensor."""
    if r is None:
        return 0, n
    lo, hi = int(r[0]), int(r[1])
    if not 0 <= lo <= hi <= n:
        raise CheckpointError(f"{where}: {what} range [{lo}, {hi}) is outside tensor {name!r} "
                              f"with {n} {what}")
    return lo, hi

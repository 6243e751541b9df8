"""Share the tiny-model fixtures of tests/lora/conftest.py as the module ``lora_testkit``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if "lora_testkit" not in sys.modules:
    _path = Path(__file__).resolve().parents[1] / "lora" / "conftest.py"
    _spec = importlib.util.spec_from_file_location("lora_testkit", _path)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["lora_testkit"] = _module
    _spec.loader.exec_module(_module)

from lora_testkit import minilm_path  # noqa: E402,F401  (the fixture)

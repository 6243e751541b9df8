"""No code execution from data: the package source never unpickles, and hostile files — a
pickle beside an adapter, a pickle in a checkpoint, a model directory asking for remote code —
never run their payload (each payload would create a marker file)."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
from rel_kit import PACKAGE_DIR, mlp, tree_digest

from rankwise.errors import AdapterFormatError
from rankwise.io import load_adapter, save_adapter
from rankwise.lora import LoraConfig, inject

CFG = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "marshal",
    "shelve",
    "joblib",
    "cloudpickle",
}


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """``("module.attr" or "name", call)`` for every call in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                out.append((f"{f.value.id}.{f.attr}", node))
            elif isinstance(f, ast.Name):
                out.append((f.id, node))
    return out


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        found += [f"imports {n}" for n in names if n in UNSAFE_MODULES]
    for name, call in _calls(tree):
        if name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
            found.append(f"line {call.lineno}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load") and _is_true(_keyword(call, "allow_pickle")):
            found.append(f"line {call.lineno}: np.load(allow_pickle=True)")
        if name == "yaml.load" or name == "yaml.unsafe_load":
            found.append(f"line {call.lineno}: {name} (use yaml.safe_load)")
        if name in ("eval", "exec"):
            found.append(f"line {call.lineno}: {name}()")
        if _is_true(_keyword(call, "trust_remote_code")):
            found.append(f"line {call.lineno}: trust_remote_code=True not chosen by the user")
        if name.startswith("subprocess.") and _is_true(_keyword(call, "shell")):
            found.append(f"line {call.lineno}: subprocess with shell=True")
    return found


def test_package_source_never_unpickles_nor_trusts_remote_code() -> None:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(files) > 20
    problems = {str(p.relative_to(PACKAGE_DIR)): _problems(p) for p in files}
    assert {k: v for k, v in problems.items() if v} == {}


def test_the_source_scan_catches_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "yaml.load(s)\nf(trust_remote_code=True)\neval('1')\n"
    )
    assert len(_problems(bad)) == 6


class _Payload:
    """Unpickling this creates ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.path),))


def _malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": _Payload(marker)}))


def test_a_bin_only_adapter_is_refused_without_unpickling(tmp_path: Path) -> None:
    directory = save_adapter(inject(mlp(), CFG, generator=0), tmp_path / "a")
    (directory / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _malicious_pickle(directory / "adapter_model.bin", marker)
    model = mlp()
    with pytest.raises(AdapterFormatError, match="never unpickles"):
        load_adapter(model, directory)
    assert not marker.exists()


def test_a_pickle_beside_the_safetensors_is_ignored(tmp_path: Path) -> None:
    directory = save_adapter(inject(mlp(), CFG, generator=0), tmp_path / "a")
    marker = tmp_path / "pwned"
    _malicious_pickle(directory / "adapter_model.bin", marker)
    load_adapter(mlp(), directory)
    assert not marker.exists()


def _poisoned_checkpoint(root: Path, marker: Path) -> Path:
    """A checkpoint whose state.pt is a malicious pickle, with matching SHA-256s."""
    import hashlib

    import torch

    from rankwise.train.checkpoint import Position, save_checkpoint

    path = save_checkpoint(root, Position(1, 0, 1), weights={"w": torch.ones(2)},
                           optimizer={}, scheduler={})  # fmt: skip
    _malicious_pickle(path / "state.pt", marker)
    index = json.loads((path / "checkpoint.json").read_text())
    index["sha256"]["state.pt"] = hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()
    (path / "checkpoint.json").write_text(json.dumps(index))
    return path


def test_a_poisoned_checkpoint_never_runs_its_payload(tmp_path: Path) -> None:
    from rankwise.train.checkpoint import read_checkpoint

    marker = tmp_path / "pwned"
    path = _poisoned_checkpoint(tmp_path / "run", marker)
    with pytest.raises(Exception):  # noqa: B017 - the class is checked in the next test
        read_checkpoint(path)
    assert not marker.exists()


def test_a_poisoned_checkpoint_is_refused_with_a_value_error(tmp_path: Path) -> None:
    from rankwise.train.checkpoint import read_checkpoint

    path = _poisoned_checkpoint(tmp_path / "run", tmp_path / "pwned")
    with pytest.raises(ValueError, match="state.pt"):
        read_checkpoint(path)


def test_remote_code_in_a_model_directory_is_not_run(tmp_path: Path) -> None:
    """A model directory whose config asks for its own code: rankwise never passes
    ``trust_remote_code``, so the code is not imported and loading fails naming the option."""
    pytest.importorskip("transformers")
    from rankwise.train.models import load_pretrained

    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil-net", "auto_map": {"AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel"}}))  # fmt: skip
    before = tree_digest(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pretrained(str(model), task="classification", label_names=("neg", "pos"))
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


def test_module_names_cannot_place_plots_outside_the_plot_directory(tmp_path: Path) -> None:
    """Adapter keys name modules, and plots are named after modules: a hostile key must not
    write outside the chosen directory."""
    import torch
    from safetensors.torch import save_file

    from rankwise.analysis import adapter_similarity
    from rankwise.analysis.plots import plot_similarity

    directory = save_adapter(inject(mlp(), CFG, generator=0), tmp_path / "work" / "adapter")

    def write(modules: list[str]) -> None:
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for module in modules:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, 8, generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(6, 2, generator=g)
        save_file(tensors, directory / "adapter_model.safetensors")
        cfg = json.loads((directory / "adapter_config.json").read_text())
        cfg["target_modules"] = modules
        (directory / "adapter_config.json").write_text(json.dumps(cfg))

    write(["../../escaped", "x"])  # '..' holds empty module names: refused when read
    with pytest.raises(AdapterFormatError, match="is not a module path"):
        adapter_similarity(directory, directory)
    write(["/tmp/absolute", "a/b"])
    plots = tmp_path / "work" / "plots"
    outside = tree_digest(tmp_path)
    written = plot_similarity(adapter_similarity(directory, directory), plots)
    assert len(written) == 2 and all(plots in p.resolve().parents for p in written)
    after = {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("work/plots")}
    assert after == outside

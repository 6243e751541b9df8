"""``rankwise version``: versions of rankwise and of the libraries it runs on."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

from rankwise import __version__

# the dependencies and extras the commands use, then the peers tests and benchmarks compare with
_PEERS = ("torch", "numpy", "safetensors", "transformers", "tokenizers", "datasets", "PyYAML",
          "tqdm", "matplotlib", "scikit-learn", "peft", "scipy")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def versions() -> dict[str, str | None]:
    """Installed versions of rankwise and its peers (None where a peer is not installed)."""
    found: dict[str, str | None] = {"rankwise": __version__, "python": platform.python_version()}
    for name in _PEERS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def run(args: argparse.Namespace) -> int:
    found = versions()
    if args.json:
        import json

        print(json.dumps(found))
    else:
        for name, version in found.items():
            print(f"{name:<14} {version or '(not installed)'}")
    return 0

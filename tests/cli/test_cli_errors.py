"""How the CLI reports failures it does not cause itself."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from rankwise import cli
from rankwise.cli import version


def test_a_peer_that_left_is_one_line_under_torchrun(monkeypatch, capsys) -> None:
    # rank 0 refused an output only it writes; rank 1 then printed gloo's 30-line traceback
    # ("Connection closed by peer") from the barrier that followed
    def lost(args) -> int:
        raise dist.DistBackendError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer")

    monkeypatch.setattr(version, "run", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["version"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "rankwise version (rank 1): error: another process stopped (its error is above), "
        "so this one did too\n"
    )
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a bug, shown in full
    with pytest.raises(dist.DistBackendError):
        cli.main(["version"])

"""``Checkpointer`` readers beside a running writer: a read-only one leaves the in-flight save
alone (orbax's start-up clean-up deletes every ``*.orbax-checkpoint-tmp`` folder it finds)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from muddit_jax.train.checkpoint import Checkpointer

IN_FLIGHT = "2.orbax-checkpoint-tmp"  # where another process's save of step 2 is being written


def _saved_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, async_save=False)
    writer.save(1, {"w": np.arange(4.0)}, {"position": 3}, {"train": {"steps": 9}})
    writer.close()
    (folder / IN_FLIGHT).mkdir()
    return folder


def test_read_only_reader_leaves_a_running_save_alone(tmp_path: Path) -> None:
    folder = _saved_folder(tmp_path)
    reader = Checkpointer(folder, read_only=True)
    assert reader.latest_step() == 1
    assert reader.saved_config(1) == (1, {"train": {"steps": 9}})
    with pytest.raises(ValueError, match="is read_only: it cannot save"):
        reader.save(3, {"w": np.zeros(4)}, {})
    time.sleep(1.0)  # orbax's clean-up runs on a background thread
    reader.close()
    assert (folder / IN_FLIGHT).is_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["1", IN_FLIGHT]

    missing = tmp_path / "not_yet"
    assert Checkpointer(missing, read_only=True).latest_step() is None
    assert not missing.exists()


def test_writer_clears_unfinished_saves(tmp_path: Path) -> None:
    """What the reader avoids: a (resumed) writer deletes the unfinished folder."""
    folder = _saved_folder(tmp_path)
    writer = Checkpointer(folder)
    deadline = time.monotonic() + 30
    while (folder / IN_FLIGHT).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    writer.close()
    assert not (folder / IN_FLIGHT).exists() and writer.latest_step() == 1

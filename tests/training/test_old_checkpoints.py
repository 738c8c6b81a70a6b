"""A last.pt written before elastic resumes (no ``plan``): it resumes on its own layout,
and a mid-epoch one warns that the rest of that epoch is drawn in the new stream order."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from test_log_every import TinyTask, tiny

from pneumo.training import loop
from pneumo.training.checkpoint import load_checkpoint


def strip_plan(run: Path) -> None:
    """last.pt as an older pneumo wrote it."""
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["plan"], ckpt["layouts"]
    torch.save(ckpt, path)


@pytest.mark.parametrize("stop", [3, 4], ids=["mid-epoch", "epoch-end"])
def test_an_old_checkpoint_resumes_and_says_what_changed(
    dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture, stop: int
) -> None:
    cfg = tiny(dataset.url, tmp_path / "run", epochs=2, steps_per_epoch=4, workers=0)

    def stop_at(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == stop and stop % 4:
            raise KeyboardInterrupt  # last.pt at this step
        if report["event"] == "epoch" and report["step"] == stop:
            raise KeyboardInterrupt  # after the epoch's last.pt

    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(cfg), progress=stop_at)
    strip_plan(Path(cfg.out))
    with caplog.at_level(logging.WARNING, logger="pneumo.training.start"):
        assert loop.run(TinyTask(cfg))["step"] == 8
    warned = [r.getMessage() for r in caplog.records if "read whole shards" in r.getMessage()]
    assert len(warned) == (1 if stop % 4 else 0)
    if warned:
        assert "the rest of epoch 0 is drawn in pieces" in warned[0]
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["plan"] == {"world_size": 1, "workers": 1}  # from its world size, workers
    assert load_checkpoint(cfg.out, "last")["plan"] == config["plan"]

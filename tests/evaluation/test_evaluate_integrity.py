"""An evaluation scores every image of its selection or fails: a test shard cut at a sample
boundary (the issue's 27 -> 20 images) stops it with one line naming the shard and the key,
in-process and from the CLI with a loader worker; and should the stream ever deliver fewer
images, the evaluation itself refuses to score them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import shard_damage as damage

from pneumo.evaluation.evaluate import EvaluateConfig, evaluate_segment
from pneumo.shards import selections, stream
from pneumo.shards.errors import IntegrityError
from pneumo.training.data import select


@pytest.fixture
def cut_dataset(trained_run, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the run's dataset whose largest shard of healthy test images is cut before
    its second sample: (the copy, the shard, the first key cut off). Healthy: their masks
    are never read, so only the loader reads this shard (in its worker, with ``--workers``)."""
    copy = damage.copy_dataset(trained_run.dataset, tmp_path / "ds")
    rows = select(str(copy), selections.SIIM_TEST + " and not has_ptx")
    shards = rows["shard"].to_pylist()
    shard = max(sorted(set(shards)), key=shards.count)
    keys = damage.keys_in(copy / shard)
    assert len(keys) >= 2, "the test split's shards are too small to cut"
    cut = damage.truncate_before_sample(copy / shard, keys[1])
    return copy, shard, cut[0]


def test_a_cut_test_shard_fails_the_evaluation(trained_run, cut_dataset) -> None:
    copy, shard, key = cut_dataset
    cfg = EvaluateConfig(run=trained_run.run, dataset=str(copy), split="test", workers=0)
    with pytest.raises(IntegrityError) as error:
        evaluate_segment(cfg)
    assert str(copy / shard) in str(error.value) and f"sample {key}" in str(error.value)


@pytest.mark.integration
def test_the_cli_says_one_line_from_a_loader_worker(trained_run, cut_dataset, pneumo) -> None:
    copy, shard, key = cut_dataset
    proc = pneumo("evaluate", "segment", trained_run.run, "--dataset", str(copy), "--split",
                  "test", "--workers", "1", check=False)  # fmt: skip
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(copy / shard) in line and f"sample {key}" in line


def test_an_evaluation_never_scores_fewer_images_than_it_selected(
    trained_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that loses a sample without a word (as the stream once did): the evaluation
    counts what it scored against its selection and names the first image missing."""
    real = stream.read_shard
    rows = select(trained_run.dataset, selections.SIIM_TEST)
    lost = min(zip(rows["shard"].to_pylist(), rows["key"].to_pylist(), strict=True))

    def losing(store, path, wanted):
        return (s for s in real(store, path, wanted) if (path, s["__key__"]) != lost)

    monkeypatch.setattr(stream, "read_shard", losing)
    cfg = EvaluateConfig(run=trained_run.run, split="test", workers=0)
    with pytest.raises(IntegrityError, match=f"of its {rows.num_rows} selected") as error:
        evaluate_segment(cfg)
    assert f"sample {lost[1]} of {lost[0]}" in str(error.value)

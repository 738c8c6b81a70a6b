"""benchmarks/bench_shuffle.py: its figures computed right, and the stream's batches mixed
on a patient-ordered set (what the benchmark reports, checked on a small one)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_shuffle.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_shuffle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_shuffle"] = module
    spec.loader.exec_module(module)
    return module


def test_the_uniform_share_is_the_chance_two_samples_share_a_patient(bench) -> None:
    # Patients of 1, 2 and 3 images: 0 + 1 + 3 same-patient pairs of 15.
    assert bench.uniform_share([1, 2, 3]) == pytest.approx(4 / 15)


def test_the_batch_share_counts_same_patient_pairs(bench) -> None:
    patient_of = {"a": "p", "b": "p", "c": "p", "d": "q", "e": "r"}
    # Batch 1: a b c d -> pairs ab ac bc of 6; batch 2: a d e -> none of 3.
    assert bench.same_patient_share([["a", "b", "c", "d"], ["a", "d", "e"]], patient_of) == 3 / 9


def test_a_patient_ordered_set_streams_in_batches_mixed_like_a_uniform_shuffle(
    bench, tmp_path: Path, capsys
) -> None:
    """120 patients of 1-30 images in patient order, batch 8, shards of 64; a 256-sample
    buffer, smaller than the set, so mixing depends on the pieces. Whole shards through a
    64 buffer (before) give batches of few patients; the defaults must not."""
    counts = bench.patient_counts(120, 0)
    url = str(tmp_path / "dataset")
    patient_of = bench.write_dataset(Path(url), counts, 64, 16)
    args = bench.argparse.Namespace(seed=0, workers=2, batch_size=8)
    uniform = bench.uniform_share(counts)
    small = {**bench.NOW, "shuffle_buffer": 256}
    assert 256 < sum(counts) / 2  # each stream worker's window is longer than the buffer
    now = bench.same_patient_share(bench.stream_batches(url, small, args), patient_of)
    before = bench.same_patient_share(bench.stream_batches(url, bench.BEFORE, args), patient_of)
    assert before > 10 * uniform  # the set is as correlated as the benchmark says
    assert now < 1.5 * uniform

"""The classifier task's parts, one at a time, against independent computations: the label
table (a file, a folder, an S3 prefix or object), its fingerprint, the model's classes, the
optimizer, the step's and validation's losses, and the summary over ranks."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pneumo.metrics.classification import classification_summary
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import open_store
from pneumo.training import classify
from pneumo.training.classify import ClassifyConfig, ClassifyTask, read_label_table
from pneumo.training.model import CLASSIFIER_ARCHS


def _cfg(**kw) -> ClassifyConfig:
    return ClassifyConfig(dataset="/data", out="/run", size=64, workers=0, **kw)


def _table(keys: list[str], labels: list[int | None], **extra) -> pa.Table:
    return pa.table({"key": keys, "label": pa.array(labels, pa.int64()), **extra})


def test_a_label_file_and_a_folder_of_parts_read_the_same(tmp_path):
    pq.write_table(_table(["a", "b", "c"], [0, 3, None]), tmp_path / "one.parquet")
    assert read_label_table(str(tmp_path / "one.parquet")) == {"a": 0, "b": 3}
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(_table(["a", "b"], [0, 3]), folder / "part-0.parquet")
    pq.write_table(_table(["d"], [1]), folder / "part-1.parquet")
    assert read_label_table(str(folder)) == {"a": 0, "b": 3, "d": 1}


def test_bad_label_tables_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(_table(["a", "b"], [1, -2]), path)
    with pytest.raises(ConfigError) as e:
        read_label_table(str(path))
    assert str(e.value) == f"label table {path}: key 'b' has a negative label -2"
    pq.write_table(_table(["a"], [None]), path)
    with pytest.raises(ConfigError) as e:
        read_label_table(str(path))
    assert str(e.value) == f"label table {path} has no labelled rows"
    missing = tmp_path / "missing.parquet"
    with pytest.raises(StoreError) as e:
        read_label_table(str(missing))
    assert str(e.value).startswith(f"cannot read label table {missing}: ")


@pytest.fixture
def fake_s3(tmp_path, monkeypatch):
    """``s3://bucket/...`` answered from a local folder, through the same Store calls."""
    root = tmp_path / "bucket"
    root.mkdir()

    def local(url: str) -> Path:
        return root / url.removeprefix("s3://bucket/")

    monkeypatch.setattr(classify, "is_s3_url", lambda url: url.startswith("s3://"))

    def prefix(url: str, create: bool):
        assert not create  # reading labels never creates a bucket or prefix
        # On S3 an object's key is also a prefix, one with nothing under it.
        path = local(url)
        return open_store(tmp_path / "nothing-under" if path.is_file() else path, create=True)

    monkeypatch.setattr(classify, "open_store", prefix)
    monkeypatch.setattr(classify, "read_url", lambda url: local(url).read_bytes())
    return root


def test_an_s3_prefix_of_parts_is_one_table_even_when_their_columns_differ(fake_s3):
    (fake_s3 / "labels").mkdir()
    pq.write_table(_table(["a"], [2]), fake_s3 / "labels" / "part-0.parquet")
    pq.write_table(_table(["b"], [5], note=["later part"]), fake_s3 / "labels" / "part-1.parquet")
    (fake_s3 / "labels" / "README.txt").write_text("not a part")
    assert read_label_table("s3://bucket/labels") == {"a": 2, "b": 5}


def test_an_s3_object_is_read_as_one_file(fake_s3):
    pq.write_table(_table(["a", "b"], [1, 0]), fake_s3 / "labels.parquet")
    assert read_label_table("s3://bucket/labels.parquet") == {"a": 1, "b": 0}


def test_the_label_fingerprint_is_the_hash_of_the_sorted_table(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(_table(["k2", "k1", "k3"], [3, 0, 1]), path)
    task = ClassifyTask(_cfg(labels=str(path)))
    rows = pa.table({"key": ["k1", "k2", "k9"], "has_ptx": [True, None, False]})
    kept = task.prepare_rows(rows, train=True)
    assert kept["key"].to_pylist() == ["k1", "k2"] and kept["label"].to_pylist() == [0, 3]
    text = "k1\t0\nk2\t3\nk3\t1\n"
    assert task.fingerprints() == {"labels": hashlib.sha256(text.encode()).hexdigest()[:16]}
    plain = ClassifyTask(_cfg())
    assert plain.prepare_rows(rows, train=True)["label"].to_pylist() == [1, 0]
    assert plain.fingerprints() == {}


def test_the_model_has_one_output_per_class_seen():
    task = ClassifyTask(_cfg())
    rows = pa.table({"key": ["a", "b", "c"], "label": pa.array([0, 4, 1], pa.int64())})
    task.use_rows(rows, rows.slice(0, 1))
    assert task.num_classes == 5
    assert task.build_model().fc.out_features == 5


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_the_optimizer_named_is_the_one_built_with_its_lr(name, kind):
    task = ClassifyTask(_cfg(optimizer=name, lr=0.0123, momentum=0.5))
    opt = task.optimizer(torch.nn.Linear(2, 2))
    assert type(opt) is kind and opt.param_groups[0]["lr"] == 0.0123
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.5


def test_labels_are_made_on_the_training_device():
    task = ClassifyTask(_cfg())
    task.label_of = {"a": 1, "b": 0}
    meta = torch.device("meta")  # a device other than the CPU, on any machine
    assert task.labels({"key": ["b", "a"]}, meta).device == meta
    job = SimpleNamespace(device=meta, net=lambda x: torch.zeros(len(x), 2, device=meta))
    batch = {"key": ["b", "a"], "image": torch.zeros(2, 1, 8, 8, dtype=torch.uint8)}
    assert task.loss(job, batch).device == meta


def _cross_entropy_sum(logits: torch.Tensor, target: list[int]) -> float:
    """Σ -log softmax(logits)[label], written out."""
    total = 0.0
    for row, label in zip(logits.double().tolist(), target, strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row))
        total += log_norm - row[label]
    return total


def test_validation_sums_the_loss_over_every_batch():
    task = ClassifyTask(_cfg())
    task.label_of = {"a": 1, "b": 0, "c": 1}
    outputs = [torch.tensor([[0.3, 1.2], [2.0, -1.0]]), torch.tensor([[-0.5, 0.25]])]
    calls = iter(outputs)
    job = SimpleNamespace(device=torch.device("cpu"), model=lambda x: next(calls))
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    batches = [
        {"key": ["a", "b"], "image": image.repeat(2, 1, 1, 1)},
        {"key": ["c"], "image": image},
    ]
    part = task.validate(job, batches)
    want = _cross_entropy_sum(outputs[0], [1, 0]) + _cross_entropy_sum(outputs[1], [1])
    assert part["loss_sum"] == pytest.approx(want, rel=1e-6)
    assert [a.tolist() for a in part["labels"]] == [[1, 0], [1]]
    np.testing.assert_allclose(part["probs"][1], torch.softmax(outputs[1], 1).numpy())


def test_the_summary_is_over_every_rank_and_the_loss_their_mean():
    task = ClassifyTask(_cfg())
    probs_a = np.array([[0.2, 0.8], [0.9, 0.1]])
    probs_b = np.array([[0.4, 0.6]])
    parts = [
        {"labels": [np.array([1, 0])], "probs": [probs_a], "loss_sum": 1.5},
        {"labels": [np.array([0])], "probs": [probs_b], "loss_sum": 0.75},
    ]
    out = task.summarise(parts)
    want = classification_summary(np.array([1, 0, 0]), np.concatenate([probs_a, probs_b]))
    assert out["loss"] == pytest.approx(2.25 / 3)
    assert {k: v for k, v in out.items() if k != "loss"} == want
    nothing = task.summarise([{"labels": [], "probs": [], "loss_sum": 0.0}])
    assert math.isnan(nothing["loss"])
    empty = classification_summary(np.zeros(0, int), np.zeros((0, 2)))
    assert {k: v for k, v in nothing.items() if k != "loss"}.keys() == empty.keys()


def test_train_classify_hands_its_progress_to_the_loop(monkeypatch):
    seen = {}

    def run(task, progress):
        seen.update(task=task, progress=progress)
        return {"ok": True}

    monkeypatch.setattr(classify.loop, "run", run)
    progress = object()
    assert classify.train_classify(_cfg(), progress) == {"ok": True}  # type: ignore[arg-type]
    assert seen["progress"] is progress and isinstance(seen["task"], ClassifyTask)


BALANCE_HELP = "expected classes, none, or pos-rate:A[:B] with rates strictly between 0 and 1"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"arch": "resnet99"}, f"--arch 'resnet99': expected one of {CLASSIFIER_ARCHS}"),
        ({"optimizer": "lbfgs"}, "--optimizer 'lbfgs': expected one of ('sgd', 'adam')"),
        ({"lr": 0.0}, "--lr must be > 0 and --momentum in [0, 1)"),
        ({"momentum": 1.0}, "--lr must be > 0 and --momentum in [0, 1)"),
        ({"momentum": -0.1}, "--lr must be > 0 and --momentum in [0, 1)"),
        (
            {"plateau_patience": -1},
            "--plateau-patience must be >= 0 and --plateau-factor in (0, 1)",
        ),
        ({"plateau_factor": 0.0}, "--plateau-patience must be >= 0 and --plateau-factor in (0, 1)"),
        ({"plateau_factor": 1.0}, "--plateau-patience must be >= 0 and --plateau-factor in (0, 1)"),
        ({"size": 31}, "--size 31: a ResNet needs at least 32 pixels"),
        ({"balance": "pos-rate:0"}, f"--balance 'pos-rate:0': {BALANCE_HELP} (e.g. pos-rate:0.5)"),
        (
            {"balance": "pos-rate:0.5:1"},
            f"--balance 'pos-rate:0.5:1': {BALANCE_HELP} (e.g. pos-rate:0.5)",
        ),
        ({"balance": "pos-rate:x"}, f"--balance 'pos-rate:x': {BALANCE_HELP} (e.g. pos-rate:0.5)"),
        ({"balance": "rate:0.5"}, f"--balance 'rate:0.5': {BALANCE_HELP} (e.g. pos-rate:0.5)"),
        (
            {"balance": "pos-rate:0.2:0.3:0.4"},
            f"--balance 'pos-rate:0.2:0.3:0.4': {BALANCE_HELP} (e.g. pos-rate:0.5)",
        ),
        # the loader's own checks, reached through the run's settings
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"workers": -1}, "--workers must not be negative (0 reads in the main process)"),
        ({"seed": -1}, "--seed must not be negative"),
        ({"in_channels": 2}, "in_channels must be 1 or 3, got 2"),
    ],
)
def test_settings_out_of_range_are_refused_with_the_reason(options, message):
    with pytest.raises(ConfigError) as e:
        ClassifyConfig(dataset="/data", out="/run", **{"size": 64, **options})
    assert str(e.value) == message


def test_settings_at_the_edges_of_their_ranges_are_accepted():
    cfg = ClassifyConfig(
        dataset="/data",
        out="/run",
        size=32,
        lr=1e-9,
        momentum=0.0,
        plateau_patience=0,
        plateau_factor=0.999,
        balance="pos-rate:0.01:0.99",
        seed=0,
        workers=0,
    )
    assert cfg.pos_rate() == (0.01, 0.99)
    assert _cfg(labels="labels.parquet").labels == str(Path("labels.parquet").resolve())


def test_a_new_task_is_binary_until_its_rows_say_otherwise(tmp_path):
    task = ClassifyTask(_cfg(in_channels=3))
    assert task.model_args() == {
        "arch": "classifier",
        "backbone": "resnet34",
        "in_channels": 3,
        "num_classes": 2,
    }
    rows = pa.table({"key": ["a", "b"], "label": pa.array([0, 1], pa.int64())})
    task.use_rows(rows, rows)
    assert task.num_classes == 2 and task.label_of == {"a": 0, "b": 1}
    unread = ClassifyTask(_cfg(labels=str(tmp_path / "t.parquet")))
    assert unread.fingerprints() == {"labels": ""}  # nothing read yet, nothing to name


def test_a_key_with_two_labels_and_pos_rate_on_many_classes_are_refused():
    task = ClassifyTask(_cfg())
    train = pa.table({"key": ["a"], "label": pa.array([0], pa.int64())})
    val = pa.table({"key": ["a"], "label": pa.array([2], pa.int64())})
    with pytest.raises(ConfigError) as e:
        task.use_rows(train, val)
    assert str(e.value) == "key 'a' has two labels (0, 2)"
    rated = ClassifyTask(_cfg(balance="pos-rate:0.5"))
    three = pa.table({"key": ["a", "b", "c"], "label": pa.array([0, 1, 2], pa.int64())})
    with pytest.raises(ConfigError) as e:
        rated.use_rows(three, three)
    assert str(e.value) == (
        "--balance pos-rate:0.5: the labels have 3 classes, a positive rate needs two "
        "(0, 1); use --balance classes"
    )


def test_rows_without_a_label_are_counted_in_a_warning_only_when_there_are_some(caplog):
    task = ClassifyTask(_cfg())
    labelled = pa.table({"key": ["a", "b"], "has_ptx": [True, False]})
    with caplog.at_level("WARNING", logger=classify.__name__):
        task.prepare_rows(labelled, train=True)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger=classify.__name__):
        task.prepare_rows(
            pa.table({"key": ["c"], "has_ptx": pa.array([None], pa.bool_())}), train=False
        )
    assert "1 validation rows have no label in has_ptx: left out" in caplog.text

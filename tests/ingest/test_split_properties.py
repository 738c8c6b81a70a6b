"""Properties of patient splits on random keys, policies and partitions (hypothesis).

A patient's split must not depend on how the images reached the dataset: in which order,
cut into which batches, by how many workers. :meth:`SplitPolicy.split` is tested directly
against the definition (a uniform draw from the key, compared with cumulative fractions
test, then val), and the batch rule (a committed patient keeps its committed split, else
the policy's: ``_UnitWriter._split`` in ``pneumo.ingest.units``, fed by
:func:`committed_splits`) is replayed over random partitions of images, without a real
ingest.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from pneumo.ingest.patients import SplitPolicy, committed_splits
from pneumo.ingest.units import _UnitWriter

PROPERTY = settings(max_examples=120, deadline=None, derandomize=True)

keys = st.text(alphabet="0123456789abcdef", min_size=1, max_size=20)


@st.composite
def fractions(draw: st.DrawFn) -> tuple[float, float, float]:
    """Three non-negative shares summing to 1, corners (0 or 1) included."""
    a, b = sorted(draw(st.sampled_from([0, 1, 2, 5, 10, 20])) for _ in range(2))
    train, val, test = a / 20, (b - a) / 20, (20 - b) / 20
    return tuple(draw(st.permutations([train, val, test])))  # type: ignore[return-value]


@st.composite
def policies(draw: st.DrawFn) -> SplitPolicy:
    return SplitPolicy(
        fractions=draw(fractions()),
        forced_test=frozenset(draw(st.lists(keys, max_size=4))),
        test_from_lists=draw(st.booleans()),
    )


def uniform(key: str) -> float:
    """The key's draw in [0, 1): the first 48 bits of sha256("split:" + key)."""
    return int(hashlib.sha256(f"split:{key}".encode()).hexdigest()[:12], 16) / 2**48


def split_by_definition(key: str, policy: SplitPolicy) -> str:
    if key in policy.forced_test:
        return "test"
    train, val, test = policy.fractions
    if policy.test_from_lists:
        if train + val == 0:
            return "test"
        train, val, test = train / (train + val), val / (train + val), 0.0
    u = uniform(key)
    return "test" if u < test else "val" if u < test + val else "train"


@PROPERTY
@given(st.lists(keys, min_size=1, max_size=30, unique=True), policies())
def test_split_follows_the_definition(patients: list[str], policy: SplitPolicy) -> None:
    again = SplitPolicy.from_json(policy.to_json())  # what a later batch reads back
    for key in patients:
        expected = split_by_definition(key, policy)
        assert policy.split(key) == expected
        assert again.split(key) == expected
        if policy.test_from_lists and key not in policy.forced_test:
            assert expected != "test" or sum(policy.fractions[:2]) == 0


@PROPERTY
@given(st.lists(keys, min_size=1, max_size=30, unique=True), fractions(), st.integers(1, 5))
def test_a_larger_test_share_never_takes_a_patient_out_of_test(
    patients: list[str], shares: tuple[float, float, float], step: int
) -> None:
    """Test grown at the expense of train: the test set only grows, the train set only
    shrinks (the thresholds are cumulative: test first, then val)."""
    train, val, test = shares
    moved = min(train, step / 20)
    small = SplitPolicy(fractions=shares)
    large = SplitPolicy(fractions=(train - moved, val, test + moved))
    for key in patients:
        before, after = small.split(key), large.split(key)
        assert before != "test" or after == "test"
        assert after != "train" or before == "train"


def test_shares_over_many_patients_match_the_fractions() -> None:
    """2,000 keys: each share within 4 points of its fraction (a binomial sd is ~1)."""
    policy = SplitPolicy(fractions=(0.6, 0.25, 0.15))
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(2000):
        counts[policy.split(f"{i:08d}")] += 1
    for name, share in zip(("train", "val", "test"), policy.fractions, strict=True):
        assert abs(counts[name] / 2000 - share) < 0.04, counts


@st.composite
def partitions(draw: st.DrawFn, n: int) -> list[int]:
    """Batch sizes (each >= 1) that add up to ``n``."""
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=5)))) if n > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


@st.composite
def images(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Images ``(image_id, patient_key)`` of a few patients, several images each."""
    n_patients = draw(st.integers(1, 8))
    patients = [f"{i:02d}{'ab'[i % 2]}" for i in range(n_patients)]
    owners = draw(st.lists(st.sampled_from(patients), min_size=1, max_size=25))
    return [(f"img{i:03d}", p) for i, p in enumerate(owners)]


def replay(
    older: list[dict[str, str]],
    arrivals: list[tuple[str, str]],
    sizes: list[int],
    workers: int,
    policy: SplitPolicy,
) -> dict[str, str]:
    """Ingest batch after batch on top of ``older`` committed rows: each batch reads the
    committed rows (committed_splits), its images are dealt round-robin to ``workers``, and
    each worker splits its images with the unit writer's own rule (a committed patient
    keeps its split, else the policy's). Returns the split of each patient's new rows."""
    rows = list(older)
    start = 0
    for size in sizes:
        batch = arrivals[start : start + size]
        start += size
        ctx = SimpleNamespace(policy=policy, committed=committed_splits(rows, policy))
        for worker in range(workers):
            unit = _UnitWriter(ctx, worker)  # type: ignore[arg-type]
            for _, patient in batch[worker::workers]:
                rows.append({"patient_key": patient, "split": unit._split(patient)})
    by_patient: dict[str, set[str]] = {}
    for r in rows[len(older) :]:
        by_patient.setdefault(r["patient_key"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values()), by_patient
    return {p: next(iter(s)) for p, s in by_patient.items()}


@PROPERTY
@given(images(), fractions(), st.data())
def test_split_is_independent_of_order_batches_and_workers(
    given_images: list[tuple[str, str]], shares: tuple[float, float, float], data: st.DataObject
) -> None:
    """Some patients were committed before (an older dataset: any split, even two): they
    keep that split; the others get the policy's, whatever the order, batches, workers."""
    policy = SplitPolicy(fractions=shares)
    patients = sorted({p for _, p in given_images})
    older = [
        {"patient_key": p, "split": s}
        for p in data.draw(st.lists(st.sampled_from(patients), unique=True))
        for s in data.draw(st.sets(st.sampled_from(["train", "val", "test"]), min_size=1))
    ]
    kept = committed_splits(older, policy)
    expected = {p: kept.get(p, split_by_definition(p, policy)) for p in patients}
    for _ in range(2):  # two arrival orders, batch cuts and worker counts
        arrivals = data.draw(st.permutations(given_images))
        sizes = data.draw(partitions(len(arrivals)))
        workers = data.draw(st.integers(1, 4))
        assert replay(older, arrivals, sizes, workers, policy) == expected


@PROPERTY
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a1", "b2", "c3", "d4"]), st.sampled_from(["train", "val", "test"])
        ),
        min_size=1,
        max_size=20,
    ),
    policies(),
    st.randoms(use_true_random=False),
)
def test_committed_splits_ignore_row_order(
    pairs: list[tuple[str, str]], policy: SplitPolicy, rnd: object
) -> None:
    """Rows of older datasets may put a patient in two splits: the patient keeps the
    policy's split if it is one of them, else the most held-out one, in any row order."""
    rows = [{"patient_key": p, "split": s} for p, s in pairs]
    got = committed_splits(rows, policy)
    shuffled = list(rows)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert committed_splits(shuffled, policy) == got
    for patient in {p for p, _ in pairs}:
        splits = {s for p, s in pairs if p == patient}
        wanted = split_by_definition(patient, policy)
        if len(splits) == 1:
            expected = next(iter(splits))
        elif wanted in splits:
            expected = wanted
        else:
            expected = next(s for s in ("test", "val", "train") if s in splits)
        assert got[patient] == expected

"""Mutation check: plant plausible bugs one at a time and see whether the tests catch them.

Each mutation below is a bug someone could plausibly write in the code that decides the
numbers pneumo reports or the data it keeps: the SIIM metric and its post-processing, the
RLE codec, the commit protocol of an ingest batch, the training stream, resume and
test-time augmentation. The script copies the tree (tracked and untracked, not ignored
files) to a temporary folder once, and for each mutation replaces one exact code snippet,
runs the fast tests that should catch it, and puts the file back. A mutation *survives* when
those tests still pass: the suite would let that bug through.

    python benchmarks/mutation.py                 # all of them (about an hour on 2 cores)
    python benchmarks/mutation.py --only rle-absolute metric-positives-only
    python benchmarks/mutation.py --list          # and whether each snippet is found

The snippets are exact text of the current code. When the code changes, a snippet may no
longer be found: the mutation is then reported as "snippet not found" (never counted as
caught); update the snippet to the new code. Before the mutations, each distinct test
selection runs once on the unmutated copy: a selection that already fails (or selects no
test) makes its mutations "baseline fails" / "no tests", not "caught".

Exit code: 0 when every planted mutation was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

METRICS = "tests/metrics/test_siim_dice.py"
RLE = ("tests/ingest/test_rle.py", "tests/ingest/test_masks.py")
COMMIT = (
    "tests/ingest/test_concurrent_writers.py",
    "tests/ingest/test_resume.py",
    "tests/ingest/test_exactly_once.py",
    "tests/ingest/test_ingest_failures.py",
    "tests/ingest/test_ingest_siim.py",
)
STORE = "tests/shards/test_store.py"
STREAM = (
    "tests/shards/test_stream.py",
    "tests/shards/test_sampling.py",
    "tests/training/test_data.py::test_loader_workers_give_every_rank_the_same_count_and_resume_exactly",
)
PER_RANK_DRAWS = "tests/training/test_classify.py::test_per_rank_draws_differ"
SEGMENT = "tests/training/test_segment.py"
RESUME = f"{SEGMENT}::test_resume_auto_continues_where_the_run_stopped"
# Segmentation draws nothing from the global generator after init; the VAE samples from it.
VAE_RESUME = "tests/training/test_autoencode.py::test_a_resumed_vae_run_draws_the_same_noise"
OTHER_DATA = f"{SEGMENT}::test_a_batch_committed_during_training_changes_nothing"
TWO_RANKS_UNEVEN = "tests/training/test_classify.py::test_two_ranks_with_uneven_validation_shares"
TTA = (
    "tests/evaluation/test_inference.py::test_tta_averages_with_the_mirrored_prediction_flipped_back",
    "tests/training/test_model.py::test_hflip_tta_is_flip_equivariant",
)


@dataclass(frozen=True)
class Mutation:
    """One plausible bug: in ``file``, the exact text ``find`` becomes ``replace``."""

    id: str
    why: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]


def _tests(*groups: str | tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for g in groups:
        out.extend([g] if isinstance(g, str) else g)
    return tuple(out)


MUTATIONS = [
    # ---- the SIIM metric: mean over images of per-image Dice, empty/empty = 1
    Mutation(
        "metric-empty-empty-zero",
        "an image with empty truth and empty prediction scores 0 instead of 1",
        "metrics/siim.py",
        "    out = np.ones_like(total)\n",
        "    out = np.zeros_like(total)\n",
        _tests(METRICS),
    ),
    Mutation(
        "metric-positives-only",
        "the overall score is the mean over positive images only (MONAI's ignore_empty)",
        "metrics/siim.py",
        '"dice": float(dice.mean()) if dice.size else float("nan"),',
        '"dice": float(dice[positive].mean()) if positive.any() else float("nan"),',
        _tests(METRICS),
    ),
    Mutation(
        "metric-dice-neg-over-all",
        "dice_neg averaged over every image instead of the healthy ones",
        "metrics/siim.py",
        '"dice_neg": float(dice[~positive].mean())',
        '"dice_neg": float(dice.mean())',
        _tests(METRICS),
    ),
    Mutation(
        "metric-iou-not-dice",
        "IoU (|P∩T| / |P∪T|) computed where Dice is meant",
        "metrics/siim.py",
        "out[nonempty] = 2.0 * inter[nonempty] / total[nonempty]",
        "out[nonempty] = inter[nonempty] / (total[nonempty] - inter[nonempty])",
        _tests(METRICS),
    ),
    # ---- post-processing: the 1st-place triplet
    Mutation(
        "postprocess-apply-strict",
        "apply() needs strictly more than min_area pixels while the search counts >=",
        "metrics/siim.py",
        "positive = top_area >= self.min_area * scale",
        "positive = top_area > self.min_area * scale",
        _tests(METRICS),
    ),
    Mutation(
        "postprocess-search-strict",
        "the search needs strictly more than min_area pixels while apply() counts >=",
        "metrics/siim.py",
        "positive = top_area >= min_area * scale  # [N, T, A, 1]",
        "positive = top_area > min_area * scale  # [N, T, A, 1]",
        _tests(METRICS),
    ),
    Mutation(
        "postprocess-area-not-scaled",
        "min_area (1024x1024 pixels) compared unscaled on a smaller probability map",
        "metrics/siim.py",
        "scale = prob.shape[-1] * prob.shape[-2] / REFERENCE_PIXELS",
        "scale = 1.0",
        _tests(METRICS),
    ),
    Mutation(
        "postprocess-mask-from-top-threshold",
        "a positive image's mask cut at the top threshold instead of the mask threshold",
        "metrics/siim.py",
        "return (prob > self.mask_threshold) & positive[..., None, None]",
        "return (prob > self.top_threshold) & positive[..., None, None]",
        _tests(METRICS),
    ),
    # ---- the SIIM RLE: relative gaps, column-major, instances OR-ed
    Mutation(
        "rle-absolute",
        "gaps read as absolute start positions instead of relative to the previous run",
        "ingest/rle.py",
        "start = pos + gap  # relative",
        "start = gap  # relative",
        _tests(RLE),
    ),
    Mutation(
        "rle-row-major",
        "the flat mask reshaped row-major (no transpose)",
        "ingest/rle.py",
        "return cv2.transpose(flat.reshape(width, height))",
        "return flat.reshape(height, width)",
        _tests(RLE),
    ),
    Mutation(
        "rle-instances-summed",
        "overlapping instances summed instead of OR-ed",
        "ingest/rle.py",
        "flat[start:end] = 1",
        "flat[start:end] += 1",
        _tests(RLE),
    ),
    Mutation(
        "rle-overrun-by-one",
        "a run one pixel past the end of the image accepted (and silently cut)",
        "ingest/rle.py",
        "if pos > height * width:",
        "if pos > height * width + 1:",
        _tests(RLE),
    ),
    # ---- the commit protocol of a batch: a lease, shards, then one Delta MERGE
    Mutation(
        "store-put-in-place",
        "LocalStore.put writes the target in place instead of a temp file renamed over it",
        "shards/store.py",
        '        with os.fdopen(fd, "wb") as f:\n',
        "        os.close(fd)\n        Path(tmp).unlink()\n        tmp = str(target)\n"
        '        with open(target, "wb") as f:\n',
        _tests(STORE, COMMIT),
    ),
    Mutation(
        "commit-merge-always-inserts",
        "the commit's MERGE never matches an existing image: concurrent writers double it",
        "shards/commits.py",
        '    "t.dataset = {dataset} AND t.dataset = s.dataset AND (t.image_id = s.image_id OR "',
        '    "1 = 0 AND t.dataset = {dataset} AND (t.image_id = s.image_id OR "',
        _tests(COMMIT),
    ),
    Mutation(
        "lease-live-holder-ignored",
        "a second attempt at a batch takes it over while the first is still writing",
        "shards/lease.py",
        "            if holder is not None and holder.alive(now):\n",
        "            if False:\n",
        _tests(COMMIT),
    ),
    Mutation(
        "vacuum-ignores-batches-in-progress",
        "vacuum removes the shards of an interrupted batch that a rerun would commit",
        "shards/vacuum.py",
        "        if len(parts) == 4 and (parts[1], parts[2]) in active:\n",
        "        if False:\n",
        _tests(COMMIT),
    ),
    Mutation(
        "commit-content-dedup-off",
        "images already in the dataset under another id (same bytes) stored again",
        "ingest/batch.py",
        'self.stored_content = frozenset(r["content_sha256"] for r in mine)',
        "self.stored_content = frozenset()",
        _tests(COMMIT),
    ),
    # ---- the training stream
    Mutation(
        "stream-rank-not-in-batch-seed",
        "every rank draws the same classes and augmentation seeds (rank left out of the seed)",
        "shards/stream.py",
        "rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, step, _BATCH])",
        "rng = np.random.default_rng([spec.seed, spec.epoch, step, _BATCH])",
        _tests(STREAM, PER_RANK_DRAWS),
    ),
    Mutation(
        "stream-slot-ignores-rank",
        "a loader worker's slot ignores its rank: every rank reads the same samples",
        "shards/stream.py",
        "slot = spec.rank * spec.workers + worker\n    streams:",
        "slot = worker\n    streams:",
        _tests(STREAM),
    ),
    Mutation(
        "stream-resume-replays",
        "on resume the steps before start_step are yielded again",
        "shards/stream.py",
        "        if step < spec.start_step:\n            continue",
        "        if step < spec.start_step:\n            pass",
        _tests(STREAM),
    ),
    Mutation(
        "stream-resume-worker-order",
        "after a resume the DataLoader's workers deliver batches out of step order",
        "shards/stream.py",
        "return (loader_worker + start_step) % workers",
        "return loader_worker % workers",
        _tests(STREAM),
    ),
    Mutation(
        "stream-same-split-every-epoch",
        "every epoch a slot draws the same window of the passes (epochs do not move on), "
        "so each epoch repeats the samples of the first (sampling is by passes now)",
        "shards/stream.py",
        "            start += spec.world_size * sum(per_worker)\n",
        "            start += 0\n",
        _tests(STREAM),
    ),
    Mutation(
        "plan-same-order-every-pass",
        "every pass over a pool lays its shards in the same order (pass number left out)",
        "shards/slots.py",
        "np.random.default_rng([*seeds, _PASS, k])",
        "np.random.default_rng([*seeds, _PASS])",
        _tests(STREAM),
    ),
    # ---- resume and validation in the training loop
    Mutation(
        "resume-rng-not-restored",
        "resume restores weights and optimizer but not the random generators",
        "training/start.py",
        '    ckpts.set_rng_state(ckpt["rng"])\n',
        "",
        _tests(RESUME, VAE_RESUME),
    ),
    Mutation(
        "resume-optimizer-not-restored",
        "resume restores the weights but restarts the optimizer",
        "training/start.py",
        '        job.optimizer.load_state_dict(ckpt["optimizer"])\n',
        "",
        _tests(RESUME),
    ),
    Mutation(
        "resume-other-data-accepted",
        "resume selects the rows again from today's manifest instead of reading back the "
        "run's pinned rows/: a run continues on other data (the design pins rows now)",
        "training/rows.py",
        "    if ckpt is not None:\n        if not (run_dir.exists(TRAIN_ROWS)",
        "    if False:\n        if not (run_dir.exists(TRAIN_ROWS)",
        _tests(OTHER_DATA),
    ),
    Mutation(
        "validate-through-ddp",
        "validation runs through the DDP wrapper (hangs when ranks hold unequal val batches); "
        "planted in the classifier, whose two-rank test gives one rank no val batch",
        "training/classify.py",
        '            logits = job.model(images_to(job.device, batch["image"])).float()',
        '            logits = job.net(images_to(job.device, batch["image"])).float()',
        _tests(TWO_RANKS_UNEVEN),
    ),
    # ---- test-time augmentation
    Mutation(
        "tta-ignored",
        "--tta accepted but the flipped image never predicted",
        "training/model.py",
        "    if tta:\n        flipped",
        "    if False:\n        flipped",
        _tests(TTA),
    ),
    Mutation(
        "tta-not-flipped-back",
        "the mirror's prediction averaged without flipping it back",
        "training/model.py",
        "probs = (probs + torch.flip(flipped, dims=[-1])) / 2",
        "probs = (probs + flipped) / 2",
        _tests(TTA),
    ),
]


def copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked and untracked files, ignored ones left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in sorted({r.decode() for r in listed if r}):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def link_parts(tree: Path) -> None:
    """Make the copy import as ``pneumo`` on its own: each part's folder (``training/``, ...)
    linked into ``tree/pneumo/`` under its name in the package. Without the links,
    ``pneumo.training`` would resolve through the installed editable finder to the
    checkout's folder, and every mutant in the copy would go untested."""
    setuptools = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools["package-dir"].items():
        if package != "pneumo":
            link = tree / "pneumo" / package.removeprefix("pneumo.")
            link.symlink_to(tree / folder, target_is_directory=True)


def test_env(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "NO_ALBUMENTATIONS_UPDATE": "1"}
    full_set = ROOT.parent / "shared" / "data"  # the copy has no ../shared beside it
    if "PNEUMO_SHARED_DATA" not in env and full_set.is_dir():
        env["PNEUMO_SHARED_DATA"] = str(full_set)
    return env


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """pytest on ``tests`` in ``tree`` (its own code first on the path): rc, seconds, tail."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=tree,
            env=test_env(tree),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # The last line (the counts), and the first failing test (-x: the one that caught it).
        failed = [ln.split(" - ")[0] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        rc, tail = proc.returncode, lines[-1:] + failed[:1]
    except subprocess.TimeoutExpired:
        rc, tail = -1, ["timed out"]
    return rc, time.monotonic() - started, " ".join(tail)


def outcome(rc: int) -> str:
    # pytest: 0 all passed, 1 some failed, 2 collection error (the mutated code does not
    # even import: caught too), 5 no test selected; -1: our timeout.
    return {0: "survived", 1: "caught", 2: "caught", 5: "no tests", -1: "timed out"}.get(
        rc, f"pytest rc {rc}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="mutation ids to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per test run")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list:  # with whether each snippet is (once) in the current code
        for m in MUTATIONS:
            path = ROOT / m.file
            count = path.read_text().count(m.find) if path.is_file() else 0
            found = "ok" if count == 1 else ("NOT FOUND" if count == 0 else f"{count} times")
            print(f"{m.id:38} {found:9} {m.file:22} {m.why}")
        return 0
    unknown = set(args.only or ()) - {m.id for m in MUTATIONS}
    if unknown:
        p.error(f"unknown mutation ids: {', '.join(sorted(unknown))}")

    tree = Path(tempfile.mkdtemp(prefix="pneumo-mutation-"))
    results: list[tuple[Mutation, str, float, str]] = []
    try:
        copy_tree(tree)
        link_parts(tree)
        baseline: dict[tuple[str, ...], tuple[int, str]] = {}
        for m in chosen:
            path = tree / m.file
            original = path.read_text() if path.is_file() else ""
            count = original.count(m.find)
            if count != 1:
                why = "snippet not found" if count == 0 else f"snippet found {count} times"
                results.append((m, why, 0.0, f"update the snippet in {m.file}"))
                print(f"{m.id:38} {why}", flush=True)
                continue
            if m.tests not in baseline:
                rc, _, tail = run_tests(tree, m.tests, args.timeout)
                baseline[m.tests] = (rc, tail)
            rc0, tail0 = baseline[m.tests]
            if rc0 != 0:
                verdict = "no tests" if rc0 == 5 else "baseline fails"
                results.append((m, verdict, 0.0, tail0))
                print(f"{m.id:38} {verdict}: {tail0}", flush=True)
                continue
            path.write_text(original.replace(m.find, m.replace))
            try:
                rc, seconds, tail = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original)
            results.append((m, outcome(rc), seconds, tail))
            print(f"{m.id:38} {outcome(rc):9} {seconds:6.0f} s  {tail}", flush=True)
    finally:
        if args.keep:
            print(f"copy kept in {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)

    planted = [r for r in results if r[1] in ("caught", "survived", "timed out")]
    caught = [r for r in planted if r[1] == "caught"]
    survived = [r for r in planted if r[1] != "caught"]
    print(
        f"\nplanted {len(planted)}, caught {len(caught)}, survived {len(survived)}, "
        f"not planted {len(results) - len(planted)} (of {len(results)})"
    )
    for m, verdict, _, _ in results:
        if verdict != "caught":
            print(f"  {verdict:18} {m.id}: {m.why} [{m.file}]")
    return 0 if not survived and len(planted) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

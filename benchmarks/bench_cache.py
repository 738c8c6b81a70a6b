"""The shard cache and S3 read-ahead: the training stream from a slow S3 against the local one.

One run, bench_loader's dataset (the SIIM demo through ingest, or the real SIIM frames),
the real training loader (``pneumo.training.data.train_batches``: read, decode, augment,
collate, in DataLoader workers) with its store opener swapped for one that wraps the store
the way ``--cache-dir`` will. S3 is moto's server on 127.0.0.1 with ``--s3-latency-ms`` of
sleep before every request (benchmarks/s3sim.py). Every contender reads whole epochs; its
rate leaves out the first batch (worker start-up, first fill of the shuffle buffer), as
bench_loader does:

1. stream local                  the dataset folder
2. stream S3                     one GET per run of samples (a piece of two, see
                                 pneumo.shards.slots), one after another
3. stream S3 + read-ahead        the GETs of the next runs opened while one is read
                                 (``pneumo.shards.cache.read_ahead`` around the stream's
                                 ``slots.positions``: the change proposed for stream.py,
                                 made here by swapping ``slots.positions``)
4.   the same, +0 ms             read-ahead without the simulated latency: what is left
                                 when the latency is hidden is the CPU of the requests
5. cache, first epoch            S3 through a fresh cache folder (and read-ahead)
6. cache, second epoch           the next epoch through the same folder

S3 bytes and requests are counted by a store wrapper under the cache, its counters shared
by the loader workers (tests/shards/test_ranged_reads.py's CountingStore counts in one
process only). CPU seconds per 100 samples are those of the loader workers and of this
process, which runs moto's server (a real S3 costs the client its requests only).

    python benchmarks/bench_cache.py [--n 800] [--size 512] [--workers 2]
        [--s3-latency-ms 20] [--rounds 5]

Each round measures every contender once, back to back; the summary gives each ratio's
range over the rounds (a ratio compares two rates of the same round).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_loader import (  # noqa: E402
    BUCKET,
    _has_ingest,
    build_from_demo,
    build_from_frames,
    upload,
)
from benchmarks.s3sim import s3_server, set_latency  # noqa: E402
from pneumo.shards import cache, selections, slots, stream  # noqa: E402
from pneumo.shards.store import Store, open_store  # noqa: E402
from pneumo.training import data  # noqa: E402

log = logging.getLogger("bench_cache")


# ---------------------------------------------------------------- the stores


class Counted:
    """A store whose reads add their bytes and requests to counters shared across fork."""

    def __init__(self, inner: Store, nbytes: Any, requests: Any) -> None:
        self.inner, self.nbytes, self.requests = inner, nbytes, requests

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _add(self, counter: Any, n: int) -> None:
        with counter.get_lock():
            counter.value += n

    def open_read(self, path: str) -> io.RawIOBase:
        self._add(self.requests, 1)
        return _Counting(self.inner.open_read(path), self)

    def open_range(self, path: str, start: int, end: int) -> io.RawIOBase:
        self._add(self.requests, 1)
        return _Counting(self.inner.open_range(path, start, end), self)

    def size(self, path: str) -> int:
        self._add(self.requests, 1)
        return self.inner.size(path)


class _Counting(io.RawIOBase):
    def __init__(self, inner: Any, store: Counted) -> None:
        super().__init__()
        self.inner, self.store = inner, store

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data_ = self.inner.read(len(buffer))
        buffer[: len(data_)] = data_
        self.store._add(self.store.nbytes, len(data_))
        return len(data_)

    def close(self) -> None:
        self.inner.close()
        super().close()


_positions = slots.positions
_opened: list[Store] = []  # the store the loader opened in this (worker) process


def positions_ahead(*args: Any, **kwargs: Any) -> Iterator[list[slots.Entry]]:
    """``slots.positions``' runs announced to the store before they are read: what the
    change proposed for stream.py does (``cache.read_ahead`` around ``slots.positions``),
    made here without editing stream.py."""
    return cache.read_ahead(_opened[0], _positions(*args, **kwargs))


# ---------------------------------------------------------------- one epoch


@dataclass
class Result:
    rate: float  # samples per second, the first batch left out
    workers_cpu: float  # CPU seconds of the loader workers per 100 samples
    main_cpu: float  # ... of this process (moto's server, in its threads)
    s3_bytes: int = 0
    s3_requests: int = 0


def epoch_rate(cfg: data.LoaderConfig, pools: dict, epoch: int, steps: int) -> Result:
    """One epoch of the training loader: its rate (the first batch left out: worker
    start-up) and the CPU it took (all of it)."""
    cpu = _cpu()
    batches = data.train_batches(
        cfg, rank=0, world_size=1, epoch=epoch, steps_per_epoch=steps, total_steps=4 * steps,
        pools=pools,
    )  # fmt: skip
    first = next(batches)
    start, samples = time.perf_counter(), 0
    for batch in batches:
        samples += len(batch["key"])
    rate = samples / (time.perf_counter() - start)
    (workers_before, main_before), (workers_after, main_after) = cpu, _cpu()
    per = 100 / (samples + len(first["key"]))
    return Result(rate, per * (workers_after - workers_before), per * (main_after - main_before))


def _cpu() -> tuple[float, float]:
    """CPU seconds of the loader workers (children, once joined) and of this process."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return children.ru_utime + children.ru_stime, own.ru_utime + own.ru_stime


@dataclass(frozen=True)
class Contender:
    """One way of reading: how each loader worker opens its store, whether the stream
    announces its reads (read-ahead), from where, which epoch, at what S3 latency."""

    name: str
    wrap: Callable[[Store], Store]
    ahead: bool
    remote: bool
    latency_ms: float
    epoch: int = 0

    def measure(self, cfg: data.LoaderConfig, pools: dict, steps: int) -> Result:
        # train_batches opens the store in each loader worker through data.open_store:
        # the workers are forked after this, so they open it the contender's way.
        data.open_store = self.open_store
        slots.positions = positions_ahead if self.ahead else _positions
        set_latency(self.latency_ms / 1000)
        try:
            return epoch_rate(cfg, pools, self.epoch, steps)
        finally:
            data.open_store, slots.positions = open_store, _positions
            set_latency(0.0)

    def open_store(self, url: str, create: bool = False) -> Store:
        _opened[:] = [self.wrap(open_store(url, create=create))]
        return _opened[0]


# ---------------------------------------------------------------- main


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=800, help="samples in the dataset")
    p.add_argument("--size", type=int, default=512, help="decode size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--shard-size", type=int, default=50, help="samples per shard")
    p.add_argument("--shuffle-buffer", type=int, default=64,
                   help="per worker: small, so the reads fall in the timed part")  # fmt: skip
    p.add_argument("--s3-latency-ms", type=float, default=20.0, help="sleep before S3 requests")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--source", choices=["auto", "demo", "frames"], default="auto")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        with s3_server(BUCKET):
            run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    use_demo = args.source == "demo" or (args.source == "auto" and _has_ingest())
    what = (build_from_demo if use_demo else build_from_frames)(tmp, args.n, args.shard_size)
    local, remote = str(tmp / "dataset"), f"s3://{BUCKET}/dataset"
    upload(tmp / "dataset", "dataset")
    shards = sorted((tmp / "dataset").rglob("*.tar"))
    dataset_bytes = sum(p.stat().st_size for p in shards)
    # The manifest read from S3, as training does: the loader workers fork with a warm
    # boto3 session (pneumo.shards.s3), not making one each (0.2-0.4 s of CPU).
    entries = stream.entries_from_table(data.select(remote, selections.SIIM_TRAIN))
    pools = stream.class_pools([e for e in entries if e.has_ptx is not None], None)
    steps = len(entries) // args.batch_size
    print(f"dataset: {len(entries)} training samples from {what}; {len(shards)} shards, "
          f"{dataset_bytes / 2**20:.1f} MiB")  # fmt: skip
    print(f"decode size {args.size}, batch {args.batch_size}, {args.workers} workers, "
          f"shuffle buffer {args.shuffle_buffer}, {steps} steps an epoch, "
          f"S3 +{args.s3_latency_ms:g} ms a request")  # fmt: skip

    cfg = data.LoaderConfig(dataset=remote, size=args.size, batch_size=args.batch_size,
                            workers=args.workers, augment=True,
                            shuffle_buffer=args.shuffle_buffer)  # fmt: skip
    nbytes, requests = multiprocessing.Value("q", 0), multiprocessing.Value("q", 0)
    folder = tmp / "cache"

    def counted(store: Store) -> Store:
        return Counted(store, nbytes, requests)  # type: ignore[return-value]

    def through_cache(store: Store) -> Store:
        return cache.cached(counted(store), folder, 2 * dataset_bytes)

    lat = args.s3_latency_ms
    contenders = [
        Contender("stream local", lambda s: s, ahead=False, remote=False, latency_ms=0),
        Contender("stream S3", counted, ahead=False, remote=True, latency_ms=lat),
        Contender("stream S3 + read-ahead", counted, ahead=True, remote=True, latency_ms=lat),
        Contender("  the same, +0 ms", counted, ahead=True, remote=True, latency_ms=0),
        Contender("cache, first epoch", through_cache, ahead=True, remote=True, latency_ms=lat),
        Contender(
            "cache, second epoch", through_cache, ahead=True, remote=True, latency_ms=lat, epoch=1
        ),  # fmt: skip
    ]
    rounds: list[dict[str, Result]] = []
    for round_ in range(args.rounds):  # interleaved rounds: others share the CPU
        shutil.rmtree(folder, ignore_errors=True)
        results = {}
        for c in contenders:
            nbytes.value = requests.value = 0
            url = remote if c.remote else local
            r = results[c.name] = c.measure(dataclasses.replace(cfg, dataset=url), pools, steps)
            r.s3_bytes, r.s3_requests = nbytes.value, requests.value
            print(f"round {round_ + 1}  {c.name:<24} samples/s {r.rate:6.1f}   S3 "
                  f"{r.s3_bytes / 2**20:5.1f} MiB, {r.s3_requests:4d} requests   CPU s per 100 "
                  f"samples: workers {r.workers_cpu:4.2f}, moto {r.main_cpu:4.2f}",
                  flush=True)  # fmt: skip
        rounds.append(results)
    summarize(rounds)


def summarize(rounds: list[dict[str, Result]]) -> None:
    print(f"summary over {len(rounds)} rounds (min - max, median; ratios within each round):")
    ratios = [
        ("S3 stream / local stream", "stream S3", "stream local", None),
        ("S3 + read-ahead / local stream", "stream S3 + read-ahead", "stream local", 0.95),
        ("S3 + read-ahead / the same at +0 ms", "stream S3 + read-ahead", "  the same, +0 ms",
         None),
        ("cache, first epoch / local stream", "cache, first epoch", "stream local", None),
        ("cache, second epoch / local stream", "cache, second epoch", "stream local", 0.98),
    ]  # fmt: skip
    for label, a, b, target in ratios:
        values = [r[a].rate / r[b].rate for r in rounds]
        verdict = "" if target is None else (
            f"  (target >= {target:g}: {'ok' if median(values) >= target else 'BELOW TARGET'})"
        )  # fmt: skip
        print(f"{label:<40} {_span(values)}{verdict}")
    # What a node whose loader is CPU-bound would get where S3's server is not on it: the
    # local stream's loader CPU per sample against the direct S3 stream's.
    cpu = [r["stream local"].workers_cpu / r["stream S3 + read-ahead"].workers_cpu for r in rounds]
    print(f"{'local / S3 + read-ahead, worker CPU':<40} {_span(cpu)}")
    shares = [
        100 * r["cache, second epoch"].s3_bytes / max(r["cache, first epoch"].s3_bytes, 1)
        for r in rounds
    ]
    verdict = "ok" if median(shares) <= 5 else "ABOVE TARGET"
    print(f"{'S3 bytes, second epoch / first, %':<40} {_span(shares)}  (target <= 5: {verdict})")
    print("CPU seconds per 100 samples, median (loader workers; moto's server in this process):")
    for name in rounds[0]:
        workers = median(r[name].workers_cpu for r in rounds)
        main = median(r[name].main_cpu for r in rounds)
        print(f"  {name:<38} {workers:5.2f}; {main:5.2f}")


def _span(values: list[float]) -> str:
    return f"{min(values):8.2f} - {max(values):8.2f}  (median {median(values):.2f})"


if __name__ == "__main__":
    main()

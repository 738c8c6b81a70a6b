"""The client CPU of one ranged S3 GET: pneumo's lean GET against boto3's ``get_object``.

moto's server runs in a child process, so this process's CPU is the client's alone (a
real bucket costs the node nothing else). One object of ``--object-mb`` MiB; each round
reads the same ``--n`` random ranges of ``--range-kb`` KiB (a training piece of two SIIM
samples is ~200 KiB) once per contender, back to back:

1. boto3            ``client.get_object(Range=...)["Body"].read()``: what pneumo did
                    before ``pneumo.shards.s3_reads``
2. pneumo lean      ``S3Store.open_range(...).read()``: the signed GET on the client's pool
3. the bytes alone  a plain urllib3 GET of a presigned URL made once (no signing, no
                    store): the floor that moving the bytes costs

    python benchmarks/bench_s3_get.py [--n 400] [--range-kb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumo.shards.s3 import S3Store  # noqa: E402
from pneumo.shards.store import open_store  # noqa: E402

BUCKET = "bench-s3-get"
_SERVER = (
    "import logging, sys, time\n"
    "from moto.server import ThreadedMotoServer\n"
    "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
    "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
    "time.sleep(3600)\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(port: int) -> None:
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"moto's server did not start on port {port}")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(read: Callable[[int, int], bytes], ranges: list[tuple[int, int]]) -> float:
    """Client CPU milliseconds per GET (a few warm-up GETs first)."""
    for start, end in ranges[:5]:
        read(start, end)
    before = _cpu()
    for start, end in ranges:
        if len(read(start, end)) != end - start:
            raise SystemExit(f"short read of bytes {start}-{end}")
    return 1000 * (_cpu() - before) / len(ranges)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="GETs per contender and round")
    p.add_argument("--range-kb", type=int, default=200)
    p.add_argument("--object-mb", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)])
    try:
        _wait_for(port)
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        )  # fmt: skip
        run(args)
    finally:
        server.kill()


def run(args: argparse.Namespace) -> None:
    import urllib3

    size, span = args.object_mb * 2**20, args.range_kb * 1024
    rng = random.Random(0)
    data = rng.randbytes(size)
    boto = S3Store(BUCKET, "")  # its client and session, before any of pneumo's reads
    boto.client.create_bucket(Bucket=BUCKET)
    boto.put("obj.bin", data)
    store = open_store(f"s3://{BUCKET}")
    assert isinstance(store, S3Store)
    url = boto.client.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "obj.bin"}, ExpiresIn=3600
    )
    pool = urllib3.PoolManager(maxsize=4)
    starts = [rng.randrange(0, size - span) for _ in range(args.n)]
    ranges = [(s, s + span) for s in starts]

    def with_boto(start: int, end: int) -> bytes:
        got = boto.client.get_object(Bucket=BUCKET, Key="obj.bin", Range=f"bytes={start}-{end - 1}")
        return got["Body"].read()  # type: ignore[no-any-return]

    def with_pneumo(start: int, end: int) -> bytes:
        with store.open_range("obj.bin", start, end) as f:
            return f.read()  # type: ignore[no-any-return]

    def bytes_alone(start: int, end: int) -> bytes:
        return pool.request("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}).data

    contenders = {"boto3 get_object": with_boto, "pneumo lean": with_pneumo,
                  "the bytes alone": bytes_alone}  # fmt: skip
    print(f"{args.n} GETs of {args.range_kb} KiB per contender and round, client CPU ms a GET:")
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, read in contenders.items():
            results[name].append(measure(read, ranges))
            print(f"round {round_ + 1}  {name:<18} {results[name][-1]:5.2f}", flush=True)
    ratios = [
        b / p for b, p in zip(results["boto3 get_object"], results["pneumo lean"], strict=True)
    ]
    print(f"boto3 / pneumo lean, client CPU a GET: {min(ratios):.2f} - {max(ratios):.2f} "
          f"(median {median(ratios):.2f})")  # fmt: skip
    for name, values in results.items():
        print(f"  {name:<18} median {median(values):5.2f} ms")


if __name__ == "__main__":
    main()

"""Fill a Kubernetes template of this folder and print it, ready for ``kubectl apply -f -``.

    python infra/k8s/render.py single --image REGISTRY/pneumo:TAG \\
        --dataset s3://pneumo/datasets/siim --run s3://pneumo/runs/r34 --gpus 4 | kubectl apply -f -
    python infra/k8s/render.py multi --nodes 2 --gpus 8 --image ... --dataset ... --run ... \\
        -- --size 512 --epochs 40 | kubectl apply -f -
    python infra/k8s/render.py ingest --parts 8 --image ... --dataset s3://pneumo/ds/siim \\
        --source s3://archive/siim/dicom-images-train \\
        --labels-url s3://archive/siim/train-rle.csv --batch siim-2026-12 | kubectl apply -f -

Everything a platform engineer sets is set here once: the image, the GPUs per node (the
template's GPU limit and torchrun's process count), the nodes (the Job's completions and
parallelism and torchrun's --nnodes), and the CPU and memory requests derived from them.
Arguments after ``--`` go to ``pneumo train segment`` (``pneumo ingest KIND`` for the
ingest Job: ``--parts`` pods, one part of the input listing each). The templates use ``${NAME}``
placeholders only, so ``envsubst`` fills them as well (export every variable listed in
README.md, "Deployment"). Standard library only: runs wherever Python does.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES = {
    "single": HERE / "train-single-node.yaml",
    "multi": HERE / "train-multi-node.yaml",
    "ingest": HERE / "ingest-indexed.yaml",
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PLAIN = re.compile(r"^[A-Za-z0-9._/:@=+-]+$")  # image references, s3:// URLs, secret names


def variables(args: argparse.Namespace) -> dict[str, str]:
    """The template's variables from the options; raises ValueError for a bad value."""
    if args.template == "ingest":
        return _ingest_variables(args)
    _check_plain(args, ("image", "dataset", "run", "s3_secret"))
    if args.gpus < 1 or args.loader_workers < 0 or args.nodes < 1:
        raise ValueError("--gpus and --nodes must be at least 1, --loader-workers at least 0")
    if args.template == "multi" and args.nodes < 2:
        raise ValueError("the multi-node template needs --nodes 2 or more (else: single)")
    return {
        "NAME": args.name,
        "IMAGE": args.image,
        "DATASET": args.dataset,
        "RUN": args.run,
        "S3_SECRET": args.s3_secret,
        "GPUS": str(args.gpus),
        "NODES": str(args.nodes),
        "LOADER_WORKERS": str(args.loader_workers),
        # One core per training process and one per loader worker of each.
        "CPUS": str(args.gpus * (args.loader_workers + 1)),
        "MEMORY": f"{args.gpus * args.memory_per_gpu}Gi",
        "SHM": f"{args.gpus * args.shm_per_gpu}Gi",
        "EXTRA_ARGS": "".join(f", {json.dumps(a)}" for a in args.train_args),
    }


def _check_plain(args: argparse.Namespace, options: tuple[str, ...]) -> None:
    """The Job name is a DNS label; the other values go into YAML as they are."""
    if not _DNS_LABEL.match(args.name) or len(args.name) > 50:
        raise ValueError(f"--name {args.name!r}: lower-case letters, digits and '-', 50 at most")
    for option in options:
        value = getattr(args, option)
        if not value or not _PLAIN.match(value):
            raise ValueError(
                f"--{option.replace('_', '-')} {value!r}: missing or unexpected characters"
            )


def _ingest_variables(args: argparse.Namespace) -> dict[str, str]:
    _check_plain(args, ("image", "dataset", "source", "labels_url", "s3_secret", "batch"))
    if args.kind not in ("siim", "nih"):
        raise ValueError(f"--kind {args.kind!r}: siim or nih")
    if args.parts < 1 or args.workers < 1:
        raise ValueError("--parts and --workers must be at least 1")
    return {
        "NAME": args.name,
        "IMAGE": args.image,
        "KIND": args.kind,
        "SOURCE": args.source,
        "DATASET": args.dataset,
        "LABELS_URL": args.labels_url,
        "BATCH": args.batch,
        "S3_SECRET": args.s3_secret,
        "PARTS": str(args.parts),
        "WORKERS": str(args.workers),
        "MEMORY": f"{2 * args.workers + 2}Gi",
        "EXTRA_ARGS": "".join(f", {json.dumps(a)}" for a in args.train_args),
    }


def render(template: str, values: dict[str, str]) -> str:
    """``template`` (a key of TEMPLATES) with every ``${NAME}`` filled."""
    return string.Template(TEMPLATES[template].read_text()).substitute(values)


def parse_args(argv: list[str]) -> argparse.Namespace:
    train_args: list[str] = []
    if "--" in argv:
        argv, train_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("template", choices=sorted(TEMPLATES))
    p.add_argument("--image", required=True, help="REGISTRY/pneumo:TAG (infra/Dockerfile)")
    p.add_argument("--dataset", required=True, help="s3://bucket/prefix of the dataset")
    p.add_argument("--run", help="s3://bucket/prefix of the run (training)")
    p.add_argument("--name", help="Job (and Service) name")
    p.add_argument("--kind", default="siim", help="ingest: siim | nih")
    p.add_argument("--source", help="ingest: s3:// prefix of the archive's images")
    p.add_argument("--labels-url", help="ingest: s3:// URL of the label file")
    p.add_argument("--batch", help="ingest: batch name (pod I writes BATCH-IofN)")
    p.add_argument("--parts", type=int, default=4, help="ingest: pods, one part each")
    p.add_argument("--workers", type=int, default=2, help="ingest: decoding processes per pod")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node = processes per node")
    p.add_argument("--nodes", type=int, default=2, help="nodes (multi only)")
    p.add_argument("--loader-workers", type=int, default=6, help="loader processes per GPU")
    p.add_argument("--memory-per-gpu", type=int, default=16, help="GiB of memory per GPU")
    p.add_argument("--shm-per-gpu", type=int, default=2, help="GiB of /dev/shm per GPU")
    p.add_argument("--s3-secret", default="pneumo-s3", help="Secret with the AWS_* variables")
    args = p.parse_args(argv)
    args.train_args = train_args
    if args.template != "ingest" and not args.run:
        p.error("--run is required for the training templates")
    if args.name is None:
        args.name = "pneumo-ingest" if args.template == "ingest" else "pneumo-train-segment"
    if args.template == "single":
        args.nodes = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        values = variables(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(render(args.template, values))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pneumo train autoencode``, ``pneumo embed`` and ``pneumo cluster``: unlabelled images
into autoencoder embeddings into pseudo-labels (for ``pneumo train classify --labels``)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from pneumo.commands.options import BatchSize, DatasetArg, LoaderWorkers, RunArg
from pneumo.commands.train import (
    AllowOverlap,
    CacheDir,
    CacheLimit,
    CheckpointEvery,
    Compile,
    Epochs,
    LogEvery,
    Out,
    PreciseBN,
    Precision,
    Resume,
    Seed,
    StepsPerEpoch,
    TrainWorkers,
    _fmt,
    _given,
    parse_size,
    run_training,
)
from pneumo.render import ProgressBar, fail_on_errors


@fail_on_errors
def train_autoencode_cmd(
    dataset: DatasetArg,
    out: Out,
    kind: Annotated[str, typer.Option(help="ae (BCE) | vae (β-VAE: ELBO).")],
    where: Annotated[
        str | None,
        typer.Option(help="Training rows (unlabelled too). Default: the train split."),
    ] = None,
    val_where: Annotated[
        str | None, typer.Option(help="Validation rows. Default: the val split.")
    ] = None,
    size: Annotated[int, typer.Option(help="Square input side (multiple of 32).")] = 256,
    latent_dim: Annotated[int, typer.Option(help="Length of the code (the VAE's mu).")] = 128,
    beta: Annotated[float, typer.Option(help="β: the KL's weight in the ELBO.")] = 4.0,
    kl_anneal_steps: Annotated[
        int | None,
        typer.Option(
            help="Steps to grow the KL weight from 0 to β. Default: a quarter of the run."
        ),
    ] = None,
    batch_size: BatchSize = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    epochs: Epochs = 10,
    steps_per_epoch: StepsPerEpoch = None,
    workers: TrainWorkers = None,
    seed: Seed = 0,
    resume: Resume = "auto",
    checkpoint_every: CheckpointEvery = 500,
    precise_bn: PreciseBN = 0,
    precision: Precision = "bf16",
    compile: Compile = False,
    log_every: LogEvery = None,
    cache_dir: CacheDir = None,
    cache_limit: CacheLimit = "50G",
    allow_overlap: AllowOverlap = False,
) -> None:
    """Train a convolutional autoencoder or β-VAE on a dataset's images (no labels read)."""
    from pneumo.training.autoencode import AutoencodeConfig, train_autoencode

    cfg = AutoencodeConfig(
        dataset=dataset,
        out=out,
        kind=kind,
        size=size,
        latent_dim=latent_dim,
        beta=beta,
        kl_anneal_steps=kl_anneal_steps,
        batch_size=batch_size,
        lr=lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        workers=workers,
        seed=seed,
        resume=resume,
        checkpoint_every=checkpoint_every,
        precise_bn=precise_bn,
        precision=precision,
        compile=compile,
        log_every=log_every,
        cache_dir=cache_dir,
        cache_limit=parse_size(cache_limit),
        allow_overlap=allow_overlap,
        **_given(where=where, val_where=val_where),
    )
    result = run_training(cfg, train=train_autoencode)
    if result is not None:
        typer.echo(
            f"step {result['step']}/{result['total_steps']}, val loss "
            f"{_fmt(result.get('val_loss'))} (best {_fmt(result.get('best_score'))}), PSNR "
            f"{_fmt(result.get('val_psnr'))} dB -> {result['run']}"
        )


@fail_on_errors
def cluster_cmd(
    embeddings: Annotated[
        str, typer.Argument(help="Parquet dataset (folder or s3://) with key and embedding.")
    ],
    out: Annotated[str, typer.Option(help="LABELS: folder or s3:// prefix for key,label.")],
    pca: Annotated[int, typer.Option(help="PCA components (whitened, then L2-normalised).")] = 50,
    min_variance: Annotated[
        float,
        typer.Option(help="Drop PCA components explaining less than this share of the variance."),
    ] = 1e-3,
    clusters: Annotated[
        int | None, typer.Option(help="Clusters wanted; DBSCAN/HDBSCAN search their radius.")
    ] = 14,
    method: Annotated[str, typer.Option(help="dbscan | hdbscan | kmeans")] = "dbscan",
    min_samples: Annotated[int, typer.Option(help="DBSCAN core-point count.")] = 10,
    min_cluster_size: Annotated[
        int | None, typer.Option(help="Fewest core points of a cluster. Default: --min-samples.")
    ] = None,
    noise: Annotated[str, typer.Option(help="drop | class (noise as one more label).")] = "drop",
    fit_where: Annotated[
        str | None,
        typer.Option(help="Rows that fit PCA and the clusters, e.g. \"split == 'train'\"."),
    ] = None,
    eps: Annotated[
        float | None, typer.Option(help="Use this DBSCAN radius / HDBSCAN cut (no search).")
    ] = None,
    max_noise: Annotated[float, typer.Option(help="Largest noise share accepted.")] = 0.5,
    sample: Annotated[
        int, typer.Option(help="DBSCAN/HDBSCAN fit on at most this many rows.")
    ] = 20_000,
    dataset: Annotated[
        str | None,
        typer.Option(help="DATASET with the images (montage). Default: the embeddings' own."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the fit sample, PCA and k-means.")] = 0,
) -> None:
    """Cluster embeddings (PCA + DBSCAN | HDBSCAN | k-means) into a pseudo-label table."""
    from pneumo.pseudolabels.cluster import ClusterConfig, cluster

    cfg = ClusterConfig(
        embeddings=embeddings,
        out=out,
        pca=pca,
        min_variance=min_variance,
        clusters=clusters,
        method=method,
        min_samples=min_samples,
        min_cluster_size=min_cluster_size,
        noise=noise,
        fit_where=fit_where,
        eps=eps,
        max_noise=max_noise,
        sample=sample,
        dataset=dataset,
        seed=seed,
    )
    with ProgressBar("cluster", unit="stage") as bar:
        stages = ["read", "pca", "fit", "write"]
        result = cluster(cfg, progress=lambda p: bar.update_to(stages.index(p["stage"]) + 1, 4))
    typer.echo(cluster_line(result))


def cluster_line(result: dict[str, Any]) -> str:
    found = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in result["parameters"].items()
        if k in ("eps", "cut", "min_samples")
    )
    noise = "" if result["method"] == "kmeans" else f", noise {result['noise_share']:.1%}"
    return (
        f"{result['clusters']} clusters ({result['method']}{': ' + found if found else ''})"
        f"{noise}, majority {result['majority_share']:.1%} of {result['labelled_rows']:,} "
        f"labelled rows -> {result['out']}"
    )


@fail_on_errors
def embed_cmd(
    run: RunArg,
    dataset: DatasetArg,
    out: Annotated[str, typer.Option(help="EMBEDDINGS: folder or s3:// prefix.")],
    where: Annotated[
        str | None, typer.Option(help="Rows to embed (manifest filter). Default: every row.")
    ] = None,
    batch_size: BatchSize = 64,
    workers: LoaderWorkers = 2,
    checkpoint: Annotated[
        str, typer.Option(help="best | last | URL of an autoencoder checkpoint.")
    ] = "best",
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 | bf16 | fp16: the encoder's autocast dtype. bf16 is faster on a GPU "
            "but moves the codes enough to change some cluster labels (recorded in _embed.json)."
        ),
    ] = "fp32",
) -> None:
    """Embed images with an autoencoder run (the VAE's mean); torchrun-able."""
    from pneumo.pseudolabels.embed import EmbedConfig, embed
    from pneumo.training.runs import DistEnv

    cfg = EmbedConfig(
        run=run,
        dataset=dataset,
        out=out,
        where=where,
        batch_size=batch_size,
        workers=workers,
        checkpoint=checkpoint,
        precision=precision,
    )
    if DistEnv.from_env().rank != 0:
        embed(cfg)
        return
    with ProgressBar("embed", unit="img") as bar:
        result = embed(cfg, progress=lambda p: bar.update_to(p["done"], p["total"]))
    typer.echo(
        f"{result['rows']:,} embeddings of {result['dim']} dimensions "
        f"({result['kind']}) -> {result['out']}"
    )

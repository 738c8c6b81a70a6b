"""``pneumo``: the command line, assembled from one module per sub-app.

Each command turns its options into a config object and makes one library call; errors of
ours become one line and exit code 1 (``--verbose`` for the traceback). Run it as
``pneumo``, ``python -m pneumo``, or under torchrun as ``torchrun ... $(which pneumo) ...``.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from pneumo.commands import (
    audit,
    batch,
    bench,
    demo,
    evaluate,
    experiment,
    ingest,
    manifest,
    train,
    unsup,
    vacuum,
    verify,
)
from pneumo.render import fail_on_errors

app = typer.Typer(
    help="pneumo: chest X-ray archives -> WebDataset shards -> pneumothorax models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help, not Rich panels: typer 0.29's panels print "<bool>" after flags that take no
    # value (--verbose, --help); its plain formatter, like every earlier typer's, does not.
    rich_markup_mode=None,
    add_completion=False,
)
app.add_typer(ingest.app, name="ingest")
app.add_typer(train.app, name="train")
app.add_typer(evaluate.app, name="evaluate")
app.add_typer(bench.app, name="bench")
app.add_typer(batch.app, name="batch")
app.command("manifest")(manifest.manifest_cmd)
app.command("demo-data")(ingest.demo_data_cmd)
app.command("predict")(evaluate.predict_cmd)
app.command("demo")(demo.demo_cmd)
app.command("audit")(audit.audit_cmd)
train.app.command("autoencode")(unsup.train_autoencode_cmd)
app.command("embed")(unsup.embed_cmd)
app.command("cluster")(unsup.cluster_cmd)
app.command("experiment")(experiment.experiment_cmd)
app.command("vacuum")(vacuum.vacuum_cmd)
app.command("verify")(verify.verify_cmd)


# The commands that log MLflow runs when tracking is on (the others ignore --tracking-uri).
TRACKED_COMMANDS = ("train", "evaluate", "experiment", "demo")
TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        show_default=False,
        help="MLflow tracking URI (e.g. sqlite:///mlflow.db, http://host:5000): every "
        "training, evaluation and experiment (its stages nested) becomes an MLflow run; "
        "MLFLOW_EXPERIMENT_NAME names the experiment (default pneumo). Give it before the "
        "command: pneumo --tracking-uri URI train segment ... Needs pip install "
        "'pneumo[tracking]'.",
    ),
]


@app.callback()
def main_options(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log details, tracebacks.")
    ] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    # albumentations asks the package index for a newer version at import unless told not to:
    # pneumo runs offline (clusters, CI) and never phones home.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom logs a decoder's traceback at ERROR for a file we quarantine anyway.
    logging.getLogger("pydicom").setLevel(logging.INFO if verbose else logging.CRITICAL)
    fail_on_errors.verbose = verbose
    if ctx.invoked_subcommand in TRACKED_COMMANDS:
        fail_on_errors(_track)(tracking_uri)


def _track(uri: str | None) -> None:
    """Tracking for this command: the option or MLFLOW_TRACKING_URI (none: mlflow is not
    imported); MLflow missing is one line and exit 1."""
    from pneumo.training import tracking

    tracking.configure(tracking.TrackingConfig.from_env(uri))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

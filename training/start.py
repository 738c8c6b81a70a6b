"""How a training run starts: fresh, or resumed from ``RUN/checkpoints/last.pt``.

:func:`start_job` does everything before the first step, the same way for every task, and
returns the :class:`pneumo.training.job.Job` that the loop (:mod:`pneumo.training.loop`)
trains: the resume point and its checks, the loader workers settled, the pinned rows
(:mod:`pneumo.training.rows`), the plan (steps per epoch, the layout that decides each
step's samples), the model and its initial weights, DDP, the optimizer, the schedule, the
run's loader (:class:`pneumo.training.run_loader.RunLoader`) and, on a resume, the state of
``last.pt``. Kept apart from the loop, whose file then reads as the run's steps.

A resume refuses, in one line, every setting that shapes the stream or the model and
differs from the run's (:func:`_check_settings`): only :data:`FREE_ON_RESUME` may change;
:data:`RUN_DECIDES` unset takes the run's own value; the number of processes and of loader
workers may change when the planned step still shares out evenly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pneumo.shards import stream
from pneumo.shards.errors import ConfigError
from pneumo.training import checkpoint as ckpts
from pneumo.training.job import STEPS_FILE, Job, Progress
from pneumo.training.rows import pin_rows
from pneumo.training.run_loader import RunLoader
from pneumo.training.runs import (
    CONFIG_FILE,
    DistEnv,
    RunDir,
    available_cpus,
    default_workers,
    grad_scaler,
    on_main,
)
from pneumo.training.task import Task, default_log_every

log = logging.getLogger(__name__)

# Settings that change nothing a run computes: a resumed run may differ in them. compile
# changes how the step's kernels are made, not what they compute (up to float rounding,
# as another GPU would).
FREE_ON_RESUME = frozenset(
    {"out", "resume", "checkpoint_every", "log_every", "compile", "cache_dir", "cache_limit"}
)
# Settings that, unset, take the run's own value on a resume. The loader workers (and the
# number of processes) may also change: the resumed run trains the planned steps on its
# layout (pneumo.shards.elastic).
RUN_DECIDES = frozenset({"workers"})
# Settings added after runs were written, with the value those runs had: a run from before
# resumes without naming them.
ADDED_SETTINGS = {"train_fraction": 1.0}


def start_job(
    task: Task, env: DistEnv, device: torch.device, run_dir: RunDir, progress: Progress | None
) -> Job:
    """Resume or start fresh: pinned rows, model, optimizer, schedule, position."""
    run_dir.clean_incomplete()
    ckpt = _resume_point(task, env, run_dir)
    task.cfg = cfg = _settled(task.cfg, env, ckpt)
    train_rows, val_rows, pinned = on_main(env, lambda: pin_rows(task, run_dir, ckpt))
    task.use_rows(train_rows, val_rows)
    plan = _plan_of(ckpt) if ckpt else {"world_size": env.world_size, "workers": cfg.workers}
    plan["workers"] = max(plan["workers"], 1)
    spe = cfg.steps_per_epoch or train_rows.num_rows // (cfg.batch_size * plan["world_size"])
    if ckpt is not None:
        spe = int(ckpt["steps_per_epoch"])  # the plan's, whatever the layout now
        if "plan" not in ckpt and int(ckpt["step"]) % spe:
            log.warning(
                "%s was saved mid-epoch by a pneumo whose stream read whole shards; the rest "
                "of epoch %d is drawn in pieces (pneumo.shards.slots), so it may repeat or "
                "miss a few of that epoch's samples; later epochs are whole passes",
                run_dir.store.url_of(ckpts.LAST), int(ckpt["step"]) // spe,
            )  # fmt: skip
    if spe < 1:
        raise ConfigError(
            f"{train_rows.num_rows} training rows give no full batch of {cfg.batch_size} on "
            f"{env.world_size} rank(s): lower --batch-size or pass --steps-per-epoch"
        )
    if ckpt is not None and ckpt.get("model_args") != task.model_args():
        raise ConfigError(
            f"cannot resume {run_dir.url}: its model is {ckpt.get('model_args')}, "
            f"now {task.model_args()}"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = task.build_model()
    chain = ckpt["init"] if ckpt else task.init_weights(model) or [ckpts.random_init(cfg.seed)]
    if device.type == "cuda":
        model = model.to(device, memory_format=torch.channels_last)
    optimizer = task.optimizer(model)
    meta = {
        "task": task.name,
        "model_args": task.model_args(),
        "config": cfg.to_dict(),
        "steps_per_epoch": spe,
        "total_steps": cfg.epochs * spe,
        "world_size": env.world_size,
        "plan": plan,  # the layout that decides each step's samples
        "layouts": _layouts(ckpt, env, cfg.workers),
        "init": chain,
        "best_metric": task.best[0],
        "train_rows": train_rows.num_rows,
        "val_rows": val_rows.num_rows,
        **pinned,
    }
    pools = task.pools(train_rows)
    val_entries = stream.entries_from_table(val_rows)
    job = Job(
        cfg=cfg,
        task=task,
        env=env,
        device=device,
        run=run_dir,
        spe=spe,
        total=meta["total_steps"],
        meta=meta,
        train_rows=train_rows,
        val_rows=val_rows,
        val_entries=val_entries,
        pools=pools,
        model=model,
        net=_step_module(model, env, device, compile=cfg.compile),
        optimizer=optimizer,
        scheduler=task.scheduler(optimizer, meta["total_steps"]),
        progress=progress,
        loader=RunLoader(
            task.loader(train=True),
            task.loader(train=False),
            rank=env.rank,
            world_size=env.world_size,
            steps_per_epoch=spe,
            total_steps=meta["total_steps"],
            planned=(plan["world_size"], plan["workers"]),
            pools=pools,
            val_entries=val_entries,
        ),
        scaler=grad_scaler(device, cfg.precision),
        log_every=cfg.log_every or default_log_every(cfg.batch_size, env.world_size),
        history=[],
    )
    if ckpt is not None:
        _restore(job, ckpt)
    about = {k: v for k, v in meta.items() if k != "config"}  # task, steps, init chain, rows
    job.run.write_json(CONFIG_FILE, {**meta["config"], **about})
    return job


def _step_module(
    model: nn.Module, env: DistEnv, device: torch.device, *, compile: bool
) -> nn.Module:
    """What the training step calls: ``model``, DDP-wrapped when distributed, compiled
    when asked (checkpoints, PreciseBN and validation use the plain ``model``)."""
    net = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    return torch.compile(net) if compile else net


def _settled(cfg: Any, env: DistEnv, ckpt: dict[str, Any] | None) -> Any:
    """``cfg`` with its unset loader workers decided: the run's own on a resume, else from
    the CPUs, rank 0's count on every rank (the stream of every rank depends on it)."""
    if cfg.workers is not None:
        return cfg
    if ckpt is not None:
        workers = int(ckpt["config"]["workers"])
    else:
        workers = on_main(env, lambda: default_workers(available_cpus(), env.local_world_size))
        log.info("%d loader workers per process (--workers to choose)", workers)
    return replace(cfg, workers=workers)


def _resume_point(task: Task, env: DistEnv, run_dir: RunDir) -> dict[str, Any] | None:
    """``last.pt`` to resume from (checked against the settings), or None: start fresh."""
    cfg = task.cfg
    exists = on_main(env, lambda: run_dir.exists(ckpts.LAST))
    if exists and cfg.resume == "never":
        raise ConfigError(
            f"{run_dir.url} already holds a run: pass --resume auto to continue it, "
            "or choose another --out"
        )
    if not exists and cfg.resume != "always":
        return None
    ckpt = ckpts.load_checkpoint(cfg.out, "last")  # "always" without one: the error says so
    _check_settings(task, env, ckpt, run_dir.url)
    return ckpt


def _check_settings(task: Task, env: DistEnv, ckpt: dict[str, Any], url: str) -> None:
    """One line naming every setting that differs from the run's, if any does."""
    old, new = _comparable(ckpt.get("config", {})), _comparable(task.cfg.to_dict())
    problems = [] if ckpt.get("task") == task.name else [f"task {ckpt.get('task')}"]
    for key in sorted(set(old) | set(new)):
        if key in FREE_ON_RESUME or key in RUN_DECIDES:
            continue
        if old.get(key) != new.get(key):
            option = "--" + key.replace("_", "-")
            problems.append(f"{option} {old.get(key)!r} (now {new.get(key)!r})")
    plan = _plan_of(ckpt)
    step_images = plan["world_size"] * task.cfg.batch_size
    if step_images % env.world_size:
        problems.append(
            f"{plan['world_size']} processes x {task.cfg.batch_size} images a step, which "
            f"{env.world_size} processes cannot share evenly (a divisor of {step_images})"
        )
    if problems:
        raise ConfigError(
            f"cannot resume {url}: it was trained with " + "; ".join(problems)
            + ". Rerun with the run's settings, or choose another --out"
        )  # fmt: skip


def _plan_of(ckpt: dict[str, Any]) -> dict[str, int]:
    """The layout a run was planned with: processes and stream workers (runs from before
    elastic resumes have only ``world_size`` and their config's workers)."""
    if "plan" in ckpt:
        return dict(ckpt["plan"])
    return {"world_size": int(ckpt["world_size"]),
            "workers": max(int(ckpt["config"]["workers"]), 1)}  # fmt: skip


def _layouts(ckpt: dict[str, Any] | None, env: DistEnv, workers: int) -> list[dict[str, int]]:
    """Each layout the run has trained on, from the step it began: the run's list, with
    this one added when it differs from the last."""
    now = {"world_size": env.world_size, "workers": max(workers, 1)}
    if ckpt is None:
        return [{"step": 0, **now}]
    layouts = list(ckpt.get("layouts") or [{"step": 0, **_plan_of(ckpt)}])
    last = layouts[-1]
    if (last["world_size"], last["workers"]) != (now["world_size"], now["workers"]):
        layouts.append({"step": int(ckpt["step"]), **now})
        log.warning(
            "resuming on %d process(es) x %d loader worker(s), planned on %d x %d: each step "
            "trains the planned samples, split over this layout",
            now["world_size"], now["workers"], layouts[0]["world_size"], layouts[0]["workers"],
        )  # fmt: skip
    return layouts


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as today's say it: one written before ``precision`` has ``amp`` alone
    (bf16 when true); ``amp`` follows precision, so it is not compared itself."""
    config = {**ADDED_SETTINGS, **config}
    amp = config.pop("amp", True)
    if config.get("precision") is None:
        config["precision"] = "bf16" if amp else "fp32"
    return config


def _restore(job: Job, ckpt: dict[str, Any]) -> None:
    """Weights, optimizer, schedule, RNG, position and history of ``last.pt`` (a finished
    run's holds the weights alone: nothing is left to train)."""
    job.model.load_state_dict(ckpt["model"])
    job.step = job.saved_step = int(ckpt["step"])
    if job.step < job.total:
        job.optimizer.load_state_dict(ckpt["optimizer"])
        if job.scheduler is not None:
            job.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # fp16 on GPU: the loss scale and its growth count
            job.scaler.load_state_dict(ckpt["scaler"])
        ckpts.set_rng_state(ckpt["rng"])
    job.best_score = ckpt.get("best_score")
    if job.run.store.exists(STEPS_FILE):  # the readings of the steps kept
        lines = job.run.store.get(STEPS_FILE).decode().splitlines()
        job.readings = [r for r in map(json.loads, lines) if r["step"] <= job.step]
    # Epochs after the checkpoint's are redone: drop their lines, keep the earlier ones.
    job.history = [r for r in job.run.metrics() if r["epoch"] < job.step // job.spe]
    log.info("resuming %s at step %d (epoch %d)", job.run.url, job.step, job.step // job.spe)

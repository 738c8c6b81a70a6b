"""The default selections: the manifest filters every task, command and recipe starts from.

Each is a ``--where`` expression (:mod:`pneumo.shards.query`), written here once and
imported wherever a default is needed, so "SIIM train" means the same rows in ``pneumo train
segment``, ``pneumo evaluate segment``, the loader and the experiment's recipes.

SIIM selections are the *labelled* images of a split (segmentation needs a mask, and the
SIIM metric a truth); NIH selections take every image of a split, since classification
tasks filter their own labels and autoencoders need none.
"""

from __future__ import annotations


def siim(split: str) -> str:
    """The labelled SIIM images of ``split``: what segmentation trains and is scored on."""
    return f"dataset == 'siim' and split == {split!r} and has_ptx is not None"


def nih(split: str) -> str:
    """Every NIH image of ``split``: what pretraining reads."""
    return f"dataset == 'nih' and split == {split!r}"


def every(split: str) -> str:
    """Every image of ``split``, of any dataset."""
    return f"split == {split!r}"


SIIM_TRAIN = siim("train")
SIIM_VAL = siim("val")
SIIM_TEST = siim("test")
NIH_TRAIN = nih("train")
NIH_VAL = nih("val")
NIH_TEST = nih("test")
TRAIN = every("train")
VAL = every("val")
# The rows a pretraining or training selection must never share a patient with.
HELD_OUT = "dataset == 'siim' and split in ['val', 'test']"

"""Scores shared by training's validation and by evaluation, defined once.

``siim``: the SIIM-ACR Dice (mean over images, empty/empty = 1) and the post-processing
triplet with its grid search; ``classification``: AUROC, balanced accuracy and the majority
rate. ``metrics`` imports nothing of pneumo: ``training`` and ``evaluation`` both import it.
"""

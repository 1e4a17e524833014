"""Names of the compression options, importable without torch so that `ensc --help` starts fast."""

from __future__ import annotations

# input perturbations during distillation (ensc.compress.perturb; docs/method.md §5)
PERTURBATIONS = ("none", "gaussian", "ods", "confods", "tdiv-sdiv")
# "auto" (what `ensc compress` passes unless told): the method's DEFAULT_PERTURB, set once the
# student's start and schedule are known (ensc.compress.warmstart.start_perturbation)
PERTURB_CHOICES = ("auto", *PERTURBATIONS)
# the default perturbation of each method: tdiv-sdiv for the BatchEnsemble (best on the validation
# split of the in-domain study, docs/results.md) but for a long warm start (warmstart.py); the
# one-network methods cannot run it
DEFAULT_PERTURB = {"batchensemble": "tdiv-sdiv", "kd-single": "none", "finetune": "none"}
# input mixing before the perturbation (ensc.compress.mix; docs/method.md §5): the teachers label
# images between two training images, where they agree less than on the images they trained on
MIXES = ("none", "mixup", "cutmix")

# batchensemble: distill into BE-M and average it (the product); kd-single: plain KD into one
# network; finetune: one network on the labels alone, no teacher in the step (the two baselines a
# user would otherwise deploy), everything else the same
COMPRESS_METHODS = ("batchensemble", "kd-single", "finetune")
SINGLE_NETWORK_METHODS = ("kd-single", "finetune")  # the student is one plain network
BASELINES = ("finetune", "kd-single")  # what --baselines may train beside a run
# fast-weight regularization (ensc.compress.distill.param_groups; docs/method.md §6)
FAST_WEIGHT_REGIMES = ("wa", "dm")
# "repeat": every member sees the whole batch (M× the compute of one network; the papers' setup);
# "split": member m sees only the m-th 1/M of it (the compute of one network, as MIMO's and the
# original BatchEnsemble's training batches).
MEMBER_BATCH_MODES = ("repeat", "split")
# each student member's KD target: "member" = teacher m for member m (when the ensembles have the
# same size, [DM], [WA]); "mean" = the teacher ensemble's mean prediction for every member
TARGET_MODES = ("member", "mean")

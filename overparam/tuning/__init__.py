"""Hyperparameter search for ``overparam fit`` runs with Optuna (``overparam tune``).

Modules:

- ``search_space``: search files, samplers and pruners.
- ``objectives``: trial values computed from the training curve.
- ``callbacks``: the pruning and outcome callbacks of a trial.
- ``trial``: the objective function.
- ``storage``: SQLite, journal file and PostgreSQL storages with heartbeats.
- ``study``: the trial budget and the worker loop.
- ``batched``: the worker loop of ``--batch-size``, which trains several trials together.
- ``report``: the trials table and the best trial.
- ``command``: the command line.

Pruning and data-parallel (DDP) training inside one trial, with optuna-integration 5.0 and
Lightning 2.6:

- One device per trial (the default, and with ``--n-workers K`` one GPU share per worker): pruning
  works with every storage.
- ``--trainer.strategy ddp_spawn --trainer.devices N``: optuna-integration's pruning callback
  accepts only RDB storages (SQLite, PostgreSQL) under DDP, because rank 0 reports and stores the
  decision as trial system attributes that the main process reads back after ``fit``; every rank
  stops through a broadcast. With a journal storage, set ``pruner: none``. The objective is
  computed on rank 0 and returned through ``trainer.callback_metrics``, which the ddp_spawn launcher
  copies back to the main process.
- ``--trainer.strategy ddp`` (Lightning's subprocess launcher) re-runs the command line once per
  rank, which would start new trials, so trials reject it.

The tests run each of these on CPU (ddp_spawn with 2 gloo processes). GPU workers and GPU DDP
are untested.

NOTE: ``LinearStackRegressor`` trains full-batch and every rank sees the whole training set, so DDP
repeats the same computation on each device; it buys no speed for these models.
"""

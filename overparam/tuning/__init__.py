"""Hyperparameter search for ``overparam fit`` runs with Optuna (``overparam tune``).

Modules: ``search_space`` (search files, samplers, pruners), ``objectives`` (values computed from
the training curve), ``callbacks`` (pruning and outcome callbacks of a trial), ``trial`` (the
objective function), ``storage`` (SQLite, journal file and PostgreSQL storages with heartbeats),
``study`` (budget and worker loop), ``report`` (trials table, best trial) and ``command`` (the CLI).

Pruning and data-parallel (DDP) training inside one trial, with optuna-integration 5.0 and
Lightning 2.6:

- One device per trial (the default, and with ``--n-workers K`` one GPU share per worker): pruning
  works with every storage. This is the tested setup.
- ``--trainer.strategy ddp_spawn --trainer.devices N``: optuna-integration's pruning callback
  accepts only RDB storages (SQLite, PostgreSQL) under DDP, because rank 0 reports and stores the
  decision as trial system attributes that the main process reads back after ``fit``; every rank
  stops through a broadcast. With a journal storage, set ``pruner: none``. The objective is
  computed on rank 0 and returned through ``trainer.callback_metrics``, which the ddp_spawn launcher
  copies back to the main process.
- ``--trainer.strategy ddp`` (Lightning's subprocess launcher) re-runs the command line once per
  rank, which would start new trials, so trials reject it.

NOTE: the DDP combinations above follow from optuna-integration's and Lightning's source; only the
single-device setup runs in the tests. ``LinearStackRegressor`` trains full-batch with every rank
seeing the whole training set, so DDP repeats the same computation on each device.
"""

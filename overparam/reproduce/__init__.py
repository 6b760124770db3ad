"""``overparam reproduce``: one command per linear-network experiment of Arora, Cohen & Hazan (ICML 2018).

Each experiment is a YAML spec file (``configs/paper/*.yaml``) that names the models to train, how
their learning rates are tuned and which claims of the paper to test. The command trains the
models, picks learning rates, evaluates every claim against stated rules, and writes curves,
``summary.csv``, a plot and ``report.md``.
"""

from overparam.reproduce.spec import ClaimSpec, ExperimentSpec, ModelSpec, SpecError, load_spec

__all__ = ["ClaimSpec", "ExperimentSpec", "ModelSpec", "SpecError", "load_spec"]

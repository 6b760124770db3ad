"""Deep linear networks for studying implicit acceleration by overparameterization."""

__version__ = "0.1.0"

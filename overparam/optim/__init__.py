"""Optimizers that emulate deep linear networks through their end-to-end matrix."""

from overparam.optim.end_to_end import EndToEndSGD, emulation_start, end_to_end_direction, set_end_to_end

__all__ = ["EndToEndSGD", "emulation_start", "end_to_end_direction", "set_end_to_end"]

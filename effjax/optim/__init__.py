"""Optimizer factory: per-parameter lr / weight-decay multipliers from parameter roles."""
from effjax.optim.factory import make_optimizer, multipliers_from_roles
from effjax.optim.schedules import make_schedule

__all__ = ["make_optimizer", "make_schedule", "multipliers_from_roles"]

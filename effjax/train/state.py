"""The train state: everything a run needs to continue bit-for-bit."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Pure pytree of the training state.

  params:    trainable parameters (pure dict mirroring the model)
  opt_state: optax state
  buffers:   non-trainable model state (MoE biases, freeze masks, EMAs, ...)
  rng:       PRNG key (raw uint32[2]) for stochastic parts of training
  step:      number of optimizer steps taken
  """
  step: jax.Array
  params: Any
  opt_state: Any
  buffers: Any
  rng: jax.Array

  def as_dict(self) -> dict:
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
            "buffers": self.buffers, "rng": self.rng}

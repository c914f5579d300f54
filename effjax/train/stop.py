"""Stop signals (SIGTERM / SIGINT) for the training loop, agreed across processes.

Moved out of trainer.py unchanged: the first signal asks the loop to checkpoint and stop at
a step every process agrees on (JAX's preemption sync point, or an allgather fallback).
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import numpy as np


class StopFlag:
  """SIGTERM / SIGINT handler: the first signal asks the loop to checkpoint and stop.

  With several processes they must all stop after the same step (the checkpoint is
  collective). With JAX's preemption service (on by default in jax.distributed), SIGTERM
  is left to its notifier, SIGINT is turned into a SIGTERM, and `poll(step)` asks JAX's
  preemption sync point, which every process reaches at the same step once any process
  got the signal. Without the service, the signal is recorded locally and `poll` shares
  it with an allgather every step.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._signals = 0
    self._multi = jax.process_count() > 1
    self._notifier = self._multi and _preemption_service_on()
    self._local = None  # without the notifier: this process's signal, until shared

  def install(self):
    if sys.platform == "win32" or not _in_main_thread():
      return
    if self._multi and not self._notifier:
      print(f"[effjax p{jax.process_index()}] JAX's preemption service is off: a stop signal "
            "is shared by an allgather every step", file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
      if not (self._notifier and sig == signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self._signals += 1
    if self._signals > 1:  # second signal: give up immediately
      raise KeyboardInterrupt
    if self._notifier:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: a stop step all agree on
    elif self._multi:
      self._local = signal.Signals(signum).name
    else:
      self.signal_name = signal.Signals(signum).name

  def poll(self, step: int) -> str | None:
    """The stop reason once this step should end the run (the same step on every process)."""
    if self.signal_name is None and self._multi:
      if self._notifier:
        if _preemption_sync_point(step):
          self.signal_name = "SIGTERM/SIGINT (stop step agreed by all processes)"
      elif _any_process(self._local is not None):
        self.signal_name = f"{self._local or 'a signal on another process'} (all processes stop)"
    return self.signal_name

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _preemption_service_on() -> bool:
  """Whether jax.distributed started its preemption sync manager (private state; treated
  as off where this JAX does not expose it, which only costs the allgather fallback)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
  except ImportError:
    return False


def _preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.reached_preemption_sync_point(step)


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))) > 0)


def _in_main_thread() -> bool:
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()

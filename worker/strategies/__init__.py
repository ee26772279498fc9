"""Training strategies that run as one long worker task: ChipNet pruning and retraining.

* :mod:`bocompress.worker.strategies.chipnet`: budget-aware soft channel pruning (Tiwari et al. 2021),
  with its gates and budgets in :mod:`bocompress.worker.strategies.gates`;
* :mod:`bocompress.worker.strategies.retrain`: fine-tune or train from scratch a found architecture
  (Liu et al. 2019: fine-tune, Scratch-E, Scratch-B);
* :mod:`bocompress.worker.strategies.training`: what both share (option errors, :class:`Cancelled`, data).

Plain torch code: no service, no HTTP. Each entry point takes ``progress(frac, message)`` and
``should_stop()`` callbacks and works on copies, so a cancel leaves nothing half-written.
"""

from bocompress.worker.strategies.training import Cancelled, OptionError

__all__ = ["Cancelled", "OptionError"]

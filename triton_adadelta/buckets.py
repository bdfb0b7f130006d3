"""Former home of the flat state and the launch plan, kept so that pickles made before issue 17 load.

A pickle names the classes of its objects by module: optimizers pickled by earlier versions refer to
``triton_adadelta.buckets.StateDict``, ``StateEntry``, ``FlatState`` and ``StateKey``. They live in
:mod:`triton_adadelta.state` now (the launch plan in :mod:`triton_adadelta.backends.triton`, the
DTensor helpers in :mod:`triton_adadelta.shards`, the table uploads in
:mod:`triton_adadelta.backends.tables`).
"""

from .state import ALIGN, MASTER_FP32, MASTER_NONE, MASTER_REMAINDER, FlatState, StateDict, StateEntry, StateKey

__all__ = ["ALIGN", "MASTER_FP32", "MASTER_NONE", "MASTER_REMAINDER", "FlatState", "StateDict", "StateEntry",
           "StateKey"]

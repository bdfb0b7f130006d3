"""triton-adadelta: a fused Triton Adadelta, a drop-in for ``torch.optim.Adadelta``."""

import importlib.util as _ilu
import os as _os
import sys as _sys

# In a source checkout the device code sits in ../kernels; the wheel ships it as triton_adadelta/kernels.
# Register the checkout's folder under the same name so both import `triton_adadelta.kernels` alike.
_here = _os.path.dirname(__file__)
_checkout_kernels = _os.path.join(_os.path.dirname(_here), "kernels")
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_checkout_kernels, "adadelta.py")
) and "triton_adadelta.kernels" not in _sys.modules:
    _spec = _ilu.spec_from_file_location(
        "triton_adadelta.kernels",
        _os.path.join(_checkout_kernels, "__init__.py"),
        submodule_search_locations=[_checkout_kernels],
    )
    _mod = _ilu.module_from_spec(_spec)
    _sys.modules["triton_adadelta.kernels"] = _mod
    _spec.loader.exec_module(_mod)

from .optimizer import Adadelta  # noqa: E402
from .reference import adadelta_update_  # noqa: E402

__all__ = ["Adadelta", "adadelta_update_"]
__version__ = "0.1.0"

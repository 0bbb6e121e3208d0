"""Optional dependencies: the ops and madfast.nn need torch alone; the trainer, data sets, reports
and command line need the ``train`` extra. A missing one is a one-line usage error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from madfast.errors import MissingExtraError

__all__ = ["require"]

# import name → the name pip installs it by, where they differ
_PIP_NAMES = {"sklearn": "scikit-learn", "yaml": "pyyaml"}


def require(module: str, purpose: str, extra: str = "train") -> ModuleType:
    """``importlib.import_module(module)``; if its package is not installed, MissingExtraError saying
    what needed it and which extra provides it (an error inside an installed package propagates)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        package = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != package:
            raise
        raise MissingExtraError(f"{purpose} needs {_PIP_NAMES.get(package, package)}, which is not installed: "
                                f"pip install 'madfast[{extra}]'") from None

"""Import a reference package (bitsandbytes, transformers, PEFT, accelerate, gguf) for a test module.

The tests compare against the real packages; without one, its modules cannot check anything. Elsewhere that
skips the module with the reason and the fix; under CI (CI=true, which CI systems set) it fails the run, so a
CI run cannot pass with whole modules of comparisons skipped.
"""

import importlib
import os
import sys
from types import ModuleType

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(name: str) -> ModuleType:
    """The module `name`; if it cannot be imported, fail under CI and skip the calling test module elsewhere."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        error = e
    caller = sys._getframe(1).f_globals.get("__name__", "?")
    reason = f"{caller} needs {name!r}, which cannot be imported ({error}); pip install -e '.[test]' installs it"
    if under_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

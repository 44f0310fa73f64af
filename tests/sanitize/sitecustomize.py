"""Makes ``import composer_numa._C`` load the sanitized build in ``$COMPOSER_NUMA_EXT_DIR``.

Put this directory on ``PYTHONPATH`` (docs/sanitizers.md): Python imports it at start-up, in the
test process and in every subprocess the tests start, and the finder below takes precedence over
an installed or editable ``composer_numa._C``. Without the variable it does nothing.
"""

import glob
import importlib.abc
import importlib.util
import os
import sys

_DIR = os.environ.get("COMPOSER_NUMA_EXT_DIR", "")


class _SanitizedExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "composer_numa._C":
            return None
        found = sorted(glob.glob(os.path.join(os.path.abspath(_DIR), "_C.*.so")))
        if not found:
            raise ImportError(f"COMPOSER_NUMA_EXT_DIR={_DIR!r} holds no _C.*.so (build it first)")
        return importlib.util.spec_from_file_location(name, found[0])


if _DIR:
    sys.meta_path.insert(0, _SanitizedExtension())

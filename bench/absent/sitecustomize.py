"""The device check's CPU rehearsal: the packages the GPU machine lacks are absent here too.

On PYTHONPATH only for `bench/device_check.py --cpu`'s child processes. Each top-level package
DEVICE_CHECK_ABSENT names (comma-separated) is set to None in sys.modules: `import ray` raises
ModuleNotFoundError and `importlib.util.find_spec("ray")` answers None, as on that machine.
"""

import os
import sys

for _name in filter(None, os.environ.get("DEVICE_CHECK_ABSENT", "").split(",")):
    sys.modules[_name] = None

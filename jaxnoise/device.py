"""The old name of :mod:`jaxnoise.analog` (the analog device models), kept so that existing code keeps importing.

``jaxnoise.device`` was renamed ``jaxnoise.analog`` and ``DeviceSpec`` ``AnalogSpec`` (issue 19: "device" means
JAX devices). Importing this module issues a :class:`DeprecationWarning`; every name of ``jaxnoise.analog``
(public and private) is reachable here, and ``DeviceSpec`` is ``AnalogSpec``. New code: ``from jaxnoise import
analog`` and ``analog.AnalogSpec``. No library module or test imports this shim (except its own test).
"""

import warnings

from jaxnoise import analog as _analog
from jaxnoise.analog import *  # noqa: F403 (the whole public API of the old module)
from jaxnoise.analog import AnalogSpec

# stacklevel 2: the importing line (warnings skips the import machinery's frames), so scripts and notebooks
# (``__main__``) show it
warnings.warn("jaxnoise.device is now jaxnoise.analog; DeviceSpec is AnalogSpec", DeprecationWarning, stacklevel=2)

DeviceSpec = AnalogSpec


def __getattr__(name: str):
    """Any other name of ``jaxnoise.analog`` (private helpers included) under the old module name."""
    try:
        return getattr(_analog, name)
    except AttributeError:
        raise AttributeError(f"module 'jaxnoise.device' (now 'jaxnoise.analog') has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(dir(_analog)))

"""Former path of the tiny chat-VLM twins: they live in :mod:`vlpeft.models.tiny.twins`.

This package is that package under its old name, module for module: ``vlpeft.testing.twins.<module>`` *is*
``vlpeft.models.tiny.twins.<module>`` (the same module object, registered under both names in ``sys.modules``), so
old imports, ``from vlpeft.testing.twins import smolvlm`` and monkeypatching through either name all keep working.
"""

import sys

from vlpeft.models.tiny import twins as _twins
from vlpeft.models.tiny.twins import TWINS, Sample, Twin, TwinSpec, build_twin, tiny_image

__all__ = ["TWINS", "Sample", "Twin", "TwinSpec", "build_twin", "tiny_image"]

# importing the twins package imported every twin module (and the shared ones they use): alias them all
for _name, _module in list(sys.modules.items()):
    if _name.startswith(_twins.__name__ + "."):
        _short = _name[len(_twins.__name__) + 1:]
        sys.modules[f"{__name__}.{_short}"] = _module
        globals()[_short] = _module

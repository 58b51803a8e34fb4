"""Helpers for vlpeft's tests: the tiny models and synthetic images of :mod:`vlpeft.models.tiny` under their
former import paths, and :mod:`vlpeft.testing.coverage` (which model families each method reaches).

Library code imports :mod:`vlpeft.models.tiny` directly; this package only keeps ``vlpeft.testing``,
``vlpeft.testing.tiny_models``, ``vlpeft.testing.images`` and ``vlpeft.testing.twins`` working.
"""

from vlpeft.models import tiny as _tiny
from vlpeft.models.tiny import *  # noqa: F403 - the former public names, exactly those of vlpeft.models.tiny

__all__ = list(_tiny.__all__)

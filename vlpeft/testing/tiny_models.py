"""Former path of the tiny families: they live in :mod:`vlpeft.models.tiny` (re-exported here for the tests)."""

from vlpeft.models import tiny as _tiny
from vlpeft.models.tiny import *  # noqa: F403 - the former public names, exactly those of vlpeft.models.tiny

__all__ = list(_tiny.__all__)

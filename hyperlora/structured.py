"""``hyperlora.structured``, the import path of :mod:`hyperlora.data.structured` that users write."""

from .data.structured import *  # noqa: F403
from .data.structured import __all__  # noqa: F401

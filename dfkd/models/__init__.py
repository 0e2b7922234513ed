"""Model architectures: the registry ``ARCHS`` (cards are in :mod:`dfkd.cards`)."""
from ..registry import Registry

ARCHS = Registry("architecture")

from . import resnet  # noqa: E402,F401  (fills ARCHS)

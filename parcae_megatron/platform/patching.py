"""A record of one replacement of a Megatron internal: its target, the version it was written
for, what it replaces, what it changes and why; ``Patch.apply`` is the one way to install it.

The records live next to their install functions (``training/megatron_patches.py``,
``platform/cpu_backend.py``); ``tests/test_megatron_patches.py`` checks the signature of every
target against the one its patch was written for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

MEGATRON_CORE = "0.19.2"

# target -> the attribute it replaced (the first time it was applied in this process), so a
# second install wraps the original again instead of its own wrapper, and the signature test
# can read the original after the patch is in place.
_ORIGINALS: dict[str, Any] = {}


@dataclass(frozen=True)
class Patch:
    """One replacement of a Megatron (or, for Megatron's sake, a library) internal."""

    target: str
    """``"package.module:Qualified.name"`` of the replaced attribute."""
    replaces: str
    """What the original does."""
    change: str
    """What the replacement does differently."""
    why: str
    """Why Parcae needs it."""
    version: str = MEGATRON_CORE
    """The megatron-core release the patch was written and tested against."""
    relies_on: tuple[str, ...] = ()
    """Other ``module:qualname`` the replacement calls with a fixed signature."""

    def owner(self) -> tuple[Any, str]:
        """The object that holds the target attribute, and the attribute's name."""
        module_name, qualname = self.target.split(":")
        obj: Any = importlib.import_module(module_name)
        *path, name = qualname.split(".")
        for part in path:
            obj = getattr(obj, part)
        return obj, name

    @property
    def name(self) -> str:
        """The attribute name the patch replaces."""
        return self.target.rsplit(".", 1)[-1].rsplit(":", 1)[-1]

    def original(self) -> Any:
        """The unpatched attribute (also after :meth:`apply`)."""
        if self.target in _ORIGINALS:
            return _ORIGINALS[self.target]
        owner, name = self.owner()
        return getattr(owner, name)

    def applied(self) -> bool:
        """Whether :meth:`apply` has installed a replacement of the target in this process."""
        return self.target in _ORIGINALS

    def apply(self, replacement: Any, instance: Any = None) -> None:
        """Install ``replacement`` at the target, or on ``instance`` (an object of the target's
        class) for a per-object patch."""
        if instance is not None:
            setattr(instance, self.name, replacement)
            return
        owner, name = self.owner()
        _ORIGINALS.setdefault(self.target, getattr(owner, name))
        setattr(owner, name, replacement)

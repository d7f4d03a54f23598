"""The validation switch of the public tensor checks, in the spirit of ``pyro.enable_validation``.

Shape, dtype and configuration checks are always on (they read attributes only). The checks that
read a tensor's values (finiteness of attention inputs, the range of gathered positions) are on
by default and may be switched off for speed once a pipeline is known to be sound::

    from bayes_router.core import validation
    validation.enable_validation(False)        # everywhere, or
    with validation.validation_enabled(False):  # inside a block
        ...

It also holds the one wording of the rules many settings share (:func:`check_positive`,
:func:`check_int`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator

import torch
from torch import Tensor

_ENABLED = True


def enable_validation(flag: bool = True) -> None:
    """Turn the value checks (finiteness, index ranges) on or off."""
    global _ENABLED
    _ENABLED = bool(flag)


def is_validation_enabled() -> bool:
    return _ENABLED


def all_finite(x: Tensor) -> bool:
    """Whether every entry of the floating tensor ``x`` is finite.

    One summing pass: a NaN or an infinity makes the sum non-finite, so a finite sum proves the
    entries finite. Only a non-finite sum (which finite entries can also give, by overflow) pays
    the exact elementwise test. On CPU the sum is much faster than ``isfinite(x).all()``, which
    builds a boolean tensor first (``docs/notes/history.md`` has the timing).
    """
    if bool(torch.isfinite(x.detach().sum())):
        return True
    return bool(torch.isfinite(x).all())


@contextlib.contextmanager
def validation_enabled(flag: bool = True) -> Iterator[None]:
    """Set the switch inside a block and restore it afterwards."""
    before = _ENABLED
    enable_validation(flag)
    try:
        yield
    finally:
        enable_validation(before)


def check_positive(name: str, value) -> float:
    """``value`` as a float, if it is a finite number > 0; else a ``ValueError`` naming ``name``.

    The rule of every positive setting (``lr``, ``tau``, ``a_min``, ...), checked where the value
    enters: a configuration's construction or a public constructor.
    """
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_int(name: str, value, least: int = 1) -> int:
    """``value`` as an ``int``, if it is an integer ``>= least`` (a Python or NumPy integer;
    ``True`` and ``False`` are not); else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)

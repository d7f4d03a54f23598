"""Input handling shared by the metric and analysis modules.

Every public metric function (:mod:`bayes_router.core`, :mod:`bayes_router.analysis`) accepts
NumPy arrays, torch tensors or nested lists. These helpers turn them into NumPy arrays and raise
``ValueError`` naming the argument when the input cannot be what the caller promised.
"""

from __future__ import annotations

import numpy as np
import torch

from bayes_router.core.validation import check_int

PROBABILITY_TOLERANCE = 1e-3  # largest accepted |sum_k p_k - 1| of a probability vector


def to_numpy(x, name: str) -> np.ndarray:
    """``x`` as a NumPy array (a tensor is detached and moved to the CPU; float16/bfloat16 are
    widened to float32 and float32/float64 keep their precision)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.numpy()
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from error
    if array.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got an object array")
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return array


def float_array(x, name: str, ndims: tuple[int, ...] | None = None,
                keep_float32: bool = False) -> np.ndarray:
    """A finite, non-empty floating array of one of the allowed numbers of dimensions."""
    array = to_numpy(x, name)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    if not (keep_float32 and array.dtype == np.float32):
        array = array.astype(np.float64)
    if ndims is not None and array.ndim not in ndims:
        shapes = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)})")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def label_array(x, name: str, n_classes: int | None = None) -> np.ndarray:
    """A 1-D int64 array, with values in ``[0, n_classes)`` when ``n_classes`` is given."""
    array = to_numpy(x, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold integer labels")
    array = array.astype(np.int64)
    if n_classes is not None:
        bad = (array < 0) | (array >= n_classes)
        if np.any(bad):
            raise ValueError(
                f"{name} must lie in [0, {n_classes}), got {int(array[bad][0])}"
            )
    return array


def check_simplex(array: np.ndarray, name: str) -> None:
    """Raise unless every vector along the last axis is a probability vector."""
    if np.any(array < 0):
        raise ValueError(f"{name} must be non-negative (probabilities), got {array.min():g}")
    deviation = np.abs(array.sum(-1, dtype=np.float64) - 1.0)
    if np.any(deviation > PROBABILITY_TOLERANCE):
        raise ValueError(
            f"{name} must sum to 1 along the last axis (tolerance {PROBABILITY_TOLERANCE:g}); "
            f"largest deviation {deviation.max():.3g}"
        )


def check_same_length(**arrays: np.ndarray) -> int:
    """The common length of the first axis of ``arrays``; raise if they differ."""
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}: {n}" for name, n in lengths.items())
        raise ValueError(f"inputs must have the same length, got {described}")
    return next(iter(lengths.values()))


def check_n_bins(n_bins) -> int:
    return check_int("n_bins", n_bins)


def equal_mass_bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value when the values, sorted (stably), are cut into ``n_bins`` runs whose
    sizes differ by at most one (the larger runs first, as :func:`numpy.array_split`); with fewer
    values than bins the last bins stay empty. Tied values may fall into neighbouring bins."""
    n = len(values)
    sizes = np.full(n_bins, n // n_bins)
    sizes[: n % n_bins] += 1
    index = np.empty(n, dtype=np.int64)
    index[np.argsort(values, kind="stable")] = np.repeat(np.arange(n_bins), sizes)
    return index

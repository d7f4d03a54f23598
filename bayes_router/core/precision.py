"""Mixed precision of the language model: which dtype its matmuls run in under autocast.

The parameters, the residual stream, the layer norms, the logits and everything Pyro sees (the
routing controller, the Dirichlet prior and guide, their samples, log-densities and KL terms) stay
in ``float32`` or ``float64`` whatever is chosen here: ``float32`` draws of a Dirichlet at the
guide floor already underflow (see :data:`~bayes_router.core.dirichlet.SAMPLING_DTYPE`), so a
half-precision routing latent would be worse. Only the LM's linear layers (the output head
included: its logits are cast back to full precision before the categorical likelihood) and the
attention experts run in the lower precision, through :func:`torch.autocast`. On CPU torch's
softmax, sum and cumsum kernels accumulate ``bfloat16``/``float16`` in ``float32`` already
(explicit ``float32`` casts in the experts gave the very same errors); CUDA's autocast returns
those ops in ``float32``, so the local kernel, whose products write into preallocated buffers,
runs with autocast off on inputs already in the compute dtype. The tests hold every expert in
both dtypes to its ``float64`` twin, outputs and gradients (on CPU; ``make gpu-check`` runs them
on CUDA).

``float16`` tops out at 65504: the linear expert's unnormalised prefix sums grow with the
sequence, so long sequences in ``float16`` can overflow where ``bfloat16`` (float32's range)
does not. Prefer ``bfloat16`` wherever the hardware has it.

``float16`` has a narrow exponent range: its gradients need loss scaling
(:func:`gradient_scaler`), ``bfloat16`` does not.
"""

from __future__ import annotations

import contextlib

import torch

#: Names accepted by ``--dtype`` / ``TrainConfig.dtype``.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """The dtype ``name`` stands for (``None``: ``float32``).

    :raises ValueError: naming the allowed values.
    """
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name}")
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """A context in which the LM's matmuls run in ``dtype`` (``None`` or ``float32``: none)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"dtype {dtype_name(dtype)}: autocast is not available on "
                         f"{device_type} in torch {torch.__version__}; use float32")
    return torch.autocast(device_type, dtype=dtype)


def full_precision(device: torch.device | str, dtype: torch.dtype | None):
    """A context that switches off the autocast of :func:`autocast` ``(device, dtype)`` inside
    its region (the router's maths); nothing where that is no autocast."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, enabled=False)


def gradient_scaler(device: torch.device | str, dtype: torch.dtype | None
                    ) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for ``float16`` training, else ``None``."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)

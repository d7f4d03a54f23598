"""The optimiser every training loop of the toolkit uses: AdamW on torch's fused kernel.

torch's default AdamW on CPU updates one parameter tensor at a time; ``fused=True`` updates all
of them in one kernel, which is faster (``docs/experts.md``, SVI step, has the timings). The
update is the same algorithm (the tests' resume and data-parallel checks run on
it); only the floating-point order of operations differs from the per-tensor loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Device types with a fused AdamW kernel in torch 2.x.
FUSED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def _tensors(params) -> list[torch.Tensor]:
    return [p for item in params
            for p in (item["params"] if isinstance(item, dict) else [item])]


def adamw(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs
          ) -> torch.optim.AdamW:
    """:class:`torch.optim.AdamW` over ``params`` (tensors or parameter groups), fused where
    every parameter is a floating tensor on one device type that has the fused kernel."""
    params = list(params)
    tensors = _tensors(params)
    devices = {p.device.type for p in tensors}
    fused = (len(devices) == 1 and devices <= set(FUSED_DEVICE_TYPES)
             and all(p.is_floating_point() for p in tensors))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=True if fused else None, **kwargs)

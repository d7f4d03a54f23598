"""The toolkit's AdamW: fused where torch has the kernel, the same update as the loop."""

import torch

from bayes_router.core.optim import adamw


def _params(seed):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop():
    fused_params, loop_params = _params(0), _params(0)
    fused = adamw(fused_params, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(20):
        torch.manual_seed(100 + step)
        grads = [torch.randn_like(p) for p in fused_params]
        for params in (fused_params, loop_params):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        fused.step()
        loop.step()
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, _params(0)[0] if a.dim() == 2 else _params(0)[1])


def test_parameter_groups_and_the_fallback():
    a, b = _params(1)
    grouped = adamw([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    assert grouped.defaults["fused"] is True
    assert [g["lr"] for g in grouped.param_groups] == [0.1, 0.2]
    meta = torch.nn.Parameter(torch.randn(3, device="meta"))  # no fused kernel there
    assert adamw([meta]).defaults["fused"] is None

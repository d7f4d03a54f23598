"""What the benchmark compares the toolkit with: baselines, not part of the method.

- :class:`PlainCausalLM`: a nanoGPT-style causal transformer of the same size as a TinyLM
  (token and position embeddings, pre-norm blocks of full causal SDPA attention and a GELU MLP,
  a tied head) trained with AdamW on cross-entropy: the step time and memory a routed LM's SVI
  step is held against.
- local attention by other means: ``F.scaled_dot_product_attention`` with a banded boolean
  mask (always available) and compiled ``flex_attention`` with a sliding-window block mask
  (where torch provides it).
- :func:`prior_free_step` with the full expert alone: the routed step's floor (its router,
  mixing and Pyro), timed beside the others so that the cheaper experts' share is measured.
- :func:`peak_memory`: the peak resident memory of a few training steps of each kind, each in
  a fresh process (the only honest per-configuration peak on the CPU, where the allocator never
  gives memory back to a process that is measured).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from queue import Empty

import pyro
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    FLEX_IMPORT_ERROR = None
except ImportError as error:  # an older torch: the baseline is reported unavailable
    create_block_mask = flex_attention = None
    FLEX_IMPORT_ERROR = str(error)

from bayes_router.core.optim import adamw
from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.objective import StepOptions, svi_step
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.prior_free import PriorFreeRoutedLM


class PlainBlock(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        D = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * D, D))

    def forward(self, h: Tensor) -> Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(B, T, D))
        return h + self.mlp(self.ln2(h))


class PlainCausalLM(nn.Module):
    """A nanoGPT-style causal LM of a TinyLM's size: one full-attention expert, no router."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.token_embedding(x) + self.position_embedding.weight[:x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_final(h))


def plain_step(cfg: TinyLMConfig, x: Tensor, y: Tensor, lr: float = 1e-4
               ) -> Callable[[], float]:
    """One AdamW step of :class:`PlainCausalLM` on ``(x, y)`` (gradient clipping included, as
    in the routed LM's step)."""
    model = PlainCausalLM(cfg)
    optimiser = adamw(model.parameters(), lr=lr)

    def step() -> float:
        loss = F.cross_entropy(model(x).reshape(-1, cfg.vocab_size), y.reshape(-1))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        return float(loss.detach())

    return step


def prior_free_step(cfg: TinyLMConfig, x: Tensor, y: Tensor,
                    experts: tuple[str, ...] | None = None, lr: float = 1e-4,
                    grad_clip: float | None = None) -> Callable[[], float]:
    """One SVI step of the prior-free routed LM of ``cfg``, or of the same LM with only
    ``experts``: with ``("full",)`` it is the step's floor, the router, the mixing and Pyro
    without the cheaper experts, which tells what those cost and how much of a target they
    leave."""
    if experts is not None:
        cfg = dataclasses.replace(cfg, experts=tuple(experts))
    with pyro.settings.context(module_local_params=True):
        model = PriorFreeRoutedLM(cfg)
    elbo = get_estimator("reparam-mc").make_elbo(max_plate_nesting=1)
    optimiser = adamw(model.parameters(), lr=lr)
    options = StepOptions(dataset_size=1000, grad_clip=grad_clip)

    def step() -> float:
        with pyro.settings.context(module_local_params=True):
            return svi_step(elbo, model, x, y, optimiser, options).loss

    return step


def banded_sdpa(window: int, seq_len: int, causal: bool = True) -> Callable:
    """Local attention as SDPA with a banded boolean mask (the dense baseline)."""
    i = torch.arange(seq_len)
    offset = i[None, :] - i[:, None]
    band = (offset >= -window) & ((offset <= 0) if causal else (offset <= window))
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def compiled_flex(window: int, seq_len: int, causal: bool = True
                  ) -> tuple[Callable | None, float | None, str | None]:
    """Compiled ``flex_attention`` with a sliding-window block mask: ``(fn, compile seconds,
    None)``, or ``(None, None, why not)`` where torch cannot provide it."""
    if flex_attention is None:
        return None, None, f"flex_attention unavailable: {FLEX_IMPORT_ERROR}"

    def sliding(b, h, q_index, k_index):
        near = q_index - k_index <= window
        return (q_index >= k_index) & near if causal else near & (k_index - q_index <= window)

    try:
        block_mask = create_block_mask(sliding, None, None, seq_len, seq_len, device="cpu")
        flex = torch.compile(flex_attention)
        probe = torch.zeros(1, 1, seq_len, 16)
        start = time.perf_counter()
        flex(probe, probe, probe, block_mask=block_mask)
        seconds = time.perf_counter() - start
    except Exception as error:  # no compiler toolchain, an unsupported backend, ...
        return None, None, f"flex_attention failed to compile: {type(error).__name__}: {error}"
    return (lambda q, k, v: flex(q, k, v, block_mask=block_mask)), seconds, None


def _rss_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux: ``clear_refs`` 5), so that the peak
    measured next is the training's, not the imports' transient one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(kind: str, spec: dict, batch_size: int, steps: int, queue) -> None:
    torch.set_num_threads(1)
    reset = _reset_peak()
    before = _rss_mb("VmRSS") if reset else None
    cfg = TinyLMConfig(**spec)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len))
    y = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len))
    if kind == "plain":
        step = plain_step(cfg, x, y)
    elif kind == "prior-free":
        step = prior_free_step(cfg, x, y, grad_clip=1.0)
    else:
        with pyro.settings.context(module_local_params=True):
            model = BayesianRoutedLM(cfg, estimator=get_estimator("reparam-analytic"))
        elbo = get_estimator("reparam-analytic").make_elbo(max_plate_nesting=1)
        optimiser = adamw(model.parameters(), lr=1e-4)
        options = StepOptions(dataset_size=1000, grad_clip=1.0)

        def step():
            with pyro.settings.context(module_local_params=True):
                svi_step(elbo, model, x, y, optimiser, options)
    for _ in range(steps):
        step()
    if reset:
        queue.put({"peak_rss_mb": _rss_mb("VmHWM"), "import_rss_mb": before,
                   "method": "VmHWM after clear_refs"})
        return
    unit = 2 ** 20 if sys.platform == "darwin" else 2 ** 10  # ru_maxrss: bytes on macOS, KiB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    queue.put({"peak_rss_mb": peak, "import_rss_mb": None, "method": "ru_maxrss"})


def peak_memory(kind: str, spec: dict, batch_size: int = 16, steps: int = 3) -> dict:
    """Peak resident memory (MiB) of ``steps`` training steps of ``kind`` (``"bayesian"``,
    ``"prior-free"`` or ``"plain"``) of the LM ``spec``, in a fresh spawned process; with the
    process's resident memory after its imports, and the difference (``training_mb``; ``None``
    where the peak cannot be reset, off Linux, and only the whole process's peak is known)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_memory_child, args=(kind, dict(spec), batch_size, steps,
                                                        queue))
    child.start()
    while True:  # a child that crashes (or is killed for memory) is a failed measurement
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not child.is_alive():
                child.join()
                raise RuntimeError(f"the {kind} memory measurement died (exit status "
                                   f"{child.exitcode})") from None
    child.join()
    result["training_mb"] = (None if result["import_rss_mb"] is None
                             else result["peak_rss_mb"] - result["import_rss_mb"])
    return result


"""Generation with per-expert caches: prefill the prompts, then decode one token at a time.

The prompts run through the routed LM's forward pass once (soft, hard or gated routing), which
fills every expert's state in that pass; each step then feeds one token per sequence, routes it
(the router decides per sequence and per layer), reads only the experts it is routed to and
samples the next token (temperature, top-k; greedy at temperature 0). The naive twin
(``naive=True``) recomputes the whole prefix at every step with no cache: the same tokens, at
a cost that grows with the context.

Routing at decode time, per token and layer (:class:`DecodeConfig`):

- ``soft``: every expert read, mixed with the posterior-mean (or softmax) weights;
- ``hard``: the argmax of those weights, one expert read;
- ``gated``: hard where the routing uncertainty (normalised to ``[0, 1]``) is below
  ``gate_threshold``, soft above it. The measure: ``total``, ``epistemic`` or ``aleatoric``
  for the Bayesian router, ``total`` (the softmax's entropy) for the prior-free one, or
  ``random``, the control: a uniform draw in place of the uncertainty, so that a fraction
  ``1 - gate_threshold`` of the tokens goes soft whatever the router thinks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bayes_router.core.options import option
from bayes_router.core.validation import check_int
from bayes_router.models.routed_lm import RoutedLM
from bayes_router.models.router import ROUTING_MODES, LayerRouting, RoutingDecision

logger = logging.getLogger(__name__)

GATE_MEASURES = ("total", "aleatoric", "epistemic", "random")


@dataclass(frozen=True)
class DecodeConfig:
    """How to generate.

    :param max_new_tokens: tokens to generate per sequence (>= 1).
    :param routing: ``"soft"``, ``"hard"`` or ``"gated"`` (see the module docstring).
    :param gate_threshold: gated routing only: a token goes hard where its normalised
        routing uncertainty is below it, in ``[0, 1]``.
    :param gate_measure: the uncertainty gated routing reads (see :data:`GATE_MEASURES`).
    :param temperature: divides the logits before sampling; ``0``: greedy (argmax).
    :param top_k: sample among the ``top_k`` most likely tokens only; ``None``: all.
    :param seed: seed of the sampling (and of the random gate): the same seed, the same text.
    """

    max_new_tokens: int = option(
        100, "tokens to generate per sequence (with learned positions the prompt and the new "
        "tokens, less one, must fit the run's --max-seq-len)")
    routing: str = option(
        "hard", "soft: every expert read and mixed; hard: each token's argmax expert only; "
        "gated: hard where the routing uncertainty is below --gate-threshold, soft above",
        choices=ROUTING_MODES)
    gate_threshold: float | None = option(
        None, "normalised uncertainty in [0, 1] of --routing gated")
    gate_measure: str = option(
        "total", "the uncertainty the gate reads (aleatoric, epistemic: the Bayesian router "
        "only); random: a uniform draw, the control at the same soft fraction",
        choices=GATE_MEASURES)
    temperature: float = option(1.0, "divides the logits before sampling; 0: greedy")
    top_k: int | None = option(
        None, "sample among the K most likely tokens only (default: all)")
    seed: int = option(0, "seed of the sampling: the same seed, the same text")

    def __post_init__(self):
        check_int("max_new_tokens", self.max_new_tokens)
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {list(ROUTING_MODES)}, got "
                             f"{self.routing!r}")
        if self.routing == "gated":
            t = self.gate_threshold
            if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
                raise ValueError(f"gate_threshold must be a number in [0, 1] (normalised "
                                 f"uncertainty) for gated routing, got {t!r}")
        elif self.gate_threshold is not None:
            raise ValueError(f"gate_threshold applies to gated routing only, got routing="
                             f"{self.routing!r} with gate_threshold={self.gate_threshold!r}")
        if self.gate_measure not in GATE_MEASURES:
            raise ValueError(f"gate_measure must be one of {list(GATE_MEASURES)}, got "
                             f"{self.gate_measure!r}")
        if self.routing != "gated" and self.gate_measure not in ("total", "random"):
            raise ValueError(f"gate_measure {self.gate_measure!r} applies to gated routing "
                             f"only (the gate reads it), got routing={self.routing!r}")
        if not isinstance(self.temperature, int | float) or isinstance(self.temperature, bool) \
                or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got "
                             f"{self.temperature!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")


@dataclass
class Generation:
    """What :func:`generate` produced.

    :param tokens: ``(B, P + N)`` each sequence's prompt then its ``N`` new tokens, left
        aligned; past ``prompt_lengths[b] + N`` the row holds padding (``-1``).
    :param prompt_lengths: ``(B,)`` the prompts' lengths.
    :param experts: ``(L, B, P + N)`` the expert each token was routed to in each layer, ``-1``
        where it went soft (every expert mixed), ``-2`` where no pass read it (padding, and
        the last token, sampled but never fed).
    :param uncertainty: ``(L, B, P + N)`` the normalised routing uncertainty the gate reads
        (``nan`` where none, or where no pass read the token).
    :param prefill_seconds: the prompts' pass.
    :param step_seconds: ``(N - 1,)`` each decoding step (one token per sequence, its forward
        pass; the sampling between steps is not counted); the first new token comes from the
        prefill's logits.
    :param cache_bytes: bytes of every expert state after the last step, all sequences.
    """

    tokens: Tensor
    prompt_lengths: Tensor
    experts: Tensor
    uncertainty: Tensor
    prefill_seconds: float
    step_seconds: Tensor
    cache_bytes: int

    @property
    def new_tokens(self) -> Tensor:
        """``(B, N)`` the generated tokens of each sequence."""
        N = self.tokens.shape[1] - int(self.prompt_lengths.max())
        index = self.prompt_lengths[:, None] + torch.arange(N)
        return self.tokens.gather(1, index)

    def soft_fraction(self) -> float:
        """Share of the (layer, token) decisions that went soft, over the tokens read."""
        read = self.experts > -2
        return float((self.experts[read] == -1).float().mean()) if bool(read.any()) else 0.0


def prompt_batch(prompts: Sequence[Sequence[int]] | Tensor) -> tuple[Tensor, Tensor]:
    """Prompts of token ids -> a right-padded ``(B, P)`` int64 batch (padding ``0``) and the
    lengths ``(B,)``; a ``(B, P)`` tensor is taken whole.

    :raises ValueError: for no prompt, or an empty one.
    """
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.is_floating_point():
            raise ValueError(f"prompts must be an integer (B, P) tensor, got "
                             f"{prompts.dtype} of shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    for i, p in enumerate(prompts):
        bad = next((t for t in p if isinstance(t, bool) or not isinstance(t, int | Integral)),
                   None)
        if bad is not None:
            raise ValueError(f"prompts must hold integer token ids; prompt {i} holds {bad!r}")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompts must not be empty (prompt {empty[0]} holds no token)")
    lengths = torch.tensor([len(p) for p in prompts])
    batch = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    return batch, lengths


def sample_next(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> Tensor:
    """``(B, V)`` logits -> ``(B,)`` next tokens: argmax at temperature 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest (nanoGPT's
    convention)."""
    if temperature == 0:
        return logits.argmax(-1)
    # the largest logit subtracted first: a tiny temperature gives -inf, never inf - inf
    logits = logits.double()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[-1]:  # exactly k, ties broken by topk
        keep = logits.topk(top_k, -1).indices
        logits = torch.full_like(logits, -math.inf).scatter_(-1, keep, logits.gather(-1, keep))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def check_measure(model: RoutedLM, config: DecodeConfig) -> None:
    """A clear error, before any pass, for a gate measure the router does not have."""
    if config.gate_measure not in ("total", "random") and model.kind != "bayesian":
        raise ValueError(f"gate_measure {config.gate_measure!r} needs the Bayesian router; a "
                         f"{model.kind} router has one measure, 'total' (or the control, "
                         f"'random')")


def check_context(model: RoutedLM, prompt_lengths: Tensor, config: DecodeConfig) -> int:
    """The tokens the longest sequence reaches; a clear error past the model's limit."""
    end = int(prompt_lengths.max()) + config.max_new_tokens - 1  # the last token is not fed
    limit = model.cfg.max_context  # None: rotary positions, no cap
    if limit is not None and end > limit:
        raise ValueError(f"a prompt of {int(prompt_lengths.max())} tokens and "
                         f"max_new_tokens={config.max_new_tokens} make the model read {end} "
                         f"positions (the last new token is only sampled); it supports {limit} "
                         f"(max_seq_len): shorten the prompt or generate fewer tokens")
    return end


@torch.no_grad()
def generate(model: RoutedLM, prompts: Sequence[Sequence[int]] | Tensor, config: DecodeConfig,
             naive: bool = False, progress: bool = False) -> Generation:
    """Generate ``config.max_new_tokens`` tokens after each prompt (see the module docstring).

    :param model: a trained routed LM (Bayesian, prior-free or static); put in eval mode here.
    :param prompts: token ids, one list per sequence (lengths may differ), or a ``(B, P)``
        tensor.
    :param naive: recompute the whole prefix at every step instead of using the caches (the
        reference; the same tokens to rounding, except under the random gate, which draws
        anew for every token of every pass).
    :param progress: show a progress bar over the steps.
    """
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    batch, lengths = prompt_batch(prompts)
    vocab = model.cfg.vocab_size
    if int(batch.min()) < 0 or int(batch.max()) >= vocab:
        raise ValueError(f"prompts hold token ids outside [0, {vocab})")
    end = check_context(model, lengths, config)
    model.eval()
    device = model.lm.token_embedding.weight.device
    generator = torch.Generator().manual_seed(config.seed)
    check_measure(model, config)
    B, P, N, L = batch.shape[0], batch.shape[1], config.max_new_tokens, model.cfg.n_layers
    tokens = torch.full((B, P + N), -1, dtype=torch.long)
    tokens[:, :P] = torch.where(torch.arange(P) < lengths[:, None], batch, -1)
    experts = torch.full((L, B, P + N), -2, dtype=torch.long)
    uncertainty = torch.full((L, B, P + N), math.nan)
    batch, lengths_dev = batch.to(device), lengths.to(device)

    def run(x: Tensor, cache, prompt_lengths=None):
        out = model.predict(x, config.routing, config.gate_threshold, config.gate_measure,
                            cache=cache, lengths=prompt_lengths, generator=generator)
        if device.type == "cuda":  # the clock stops when the step is done, not launched
            torch.cuda.synchronize(device)
        return out

    def record(out, columns: Tensor) -> None:  # columns (B, T) of the tokens just read
        for layer, routing in enumerate(out.routing):
            index = routing.expert_index
            if index is None:  # soft: every token mixed
                index = torch.full(columns.shape, -1, dtype=torch.long)
            experts[layer].scatter_(1, columns, index.cpu().long())
            u = routing.decision.uncertainty
            if u is not None:
                uncertainty[layer].scatter_(1, columns, u.detach().float().cpu())

    cache = None if naive else model.lm.new_cache(B, capacity=end)
    start = time.perf_counter()
    out = run(batch, cache, None if naive else lengths_dev)
    prefill_seconds = time.perf_counter() - start
    columns = torch.arange(P).expand(B, P)
    record(out, columns)
    padding = columns >= lengths[:, None]  # (B, P): the prompts' padding, not read
    experts[:, :, :P].masked_fill_(padding, -2)
    uncertainty[:, :, :P].masked_fill_(padding, math.nan)
    last = out.logits[torch.arange(B), lengths_dev - 1]  # (B, V)
    position = lengths.clone()  # where each sequence's next token goes
    steps = []
    bar = tqdm(total=N, desc="generate", unit="tok", disable=not progress)
    for step in range(N):
        token = sample_next(last.float(), config.temperature, config.top_k, generator)
        tokens[torch.arange(B), position] = token.cpu()
        bar.update(1)
        if step == N - 1:
            break
        start = time.perf_counter()
        if naive:
            length = int(position.max()) + 1
            x = tokens[:, :length].clamp(min=0).to(device)
            out = run(x, None)
            last = out.logits[torch.arange(B), position.to(device)]
            out.routing = [_rows_at(r, position) for r in out.routing]
        else:
            out = run(token[:, None].to(device), cache)
            last = out.logits[:, 0]
        steps.append(time.perf_counter() - start)
        record(out, position[:, None])
        position = position + 1
    bar.close()
    return Generation(tokens, lengths, experts, uncertainty, prefill_seconds,
                      torch.tensor(steps, dtype=torch.float64),
                      0 if cache is None else cache.nbytes)


def _rows_at(routing: LayerRouting, position: Tensor) -> LayerRouting:
    """The routing of a whole-prefix pass at each sequence's ``position`` only ``(B, 1)``."""
    def pick(t):
        return None if t is None else t.gather(1, position.to(t.device)[:, None])

    decision = RoutingDecision(weights=routing.decision.weights, mean=routing.decision.mean,
                               uncertainty=pick(routing.decision.uncertainty))
    return LayerRouting(routing.features, decision, routing.applied_weights,
                        pick(routing.expert_index), pick(routing.hard_mask))

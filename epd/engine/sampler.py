"""Turns one step's logits into next tokens (and logprobs), one row per request.

Style note: this runs every decode step. Masking is vectorised over the batch; only the
multinomial draw loops over rows, because each seeded request owns its own generator.
A row's result must not depend on the other rows in the batch (seeded reproducibility), so every
row goes through the same ops in token-id order whatever features its neighbours use.

A seeded request's draw of output token n starts from `draw_seed(seed, n)`, never from what its
earlier draws left in the generator (epd.engine.request: `Request.generator`). So its tokens depend
on (seed, position) alone: a request continued on another instance after a death (prompt and
tokens so far prefilled again: epd.cluster.router.recovery) draws exactly what it would have drawn
undisturbed, whatever amount of randomness the device's multinomial used per draw before.

`Sampler.sample` leaves the draws on the device (`DeviceSample`), with no host sync: async scheduling
(epd.engine.async_scheduling) feeds them to the next step before the host reads them. The small
tensors it sends to the device go through pinned memory, so that they do not wait for the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from epd.outputs import Logprob, PositionLogprobs
from epd.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's draw of output token `position` (0: the first).

    splitmix64 of (seed, position): neighbouring seeds and positions give unrelated streams.
    Any seed torch accepts ([-2**63, 2**64 - 1]) works; the result is in [0, 2**64).
    """
    x = ((seed & _MASK64) + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # per row; None when that request asked for no logprobs


@dataclass
class TopLogprobs:
    """The logprobs some rows of a step asked for, as tensors (on the device, or copied to the host).

    Row r of each tensor is batch row `rows[r]`, which reports its top `counts[r]` tokens; the top
    tensors hold the top k of all of them (k: the largest count, at most the vocabulary).
    """

    rows: list[int]
    counts: list[int]
    sampled_ids: torch.Tensor  # [len(rows)]
    sampled_lp: torch.Tensor  # [len(rows)]
    sampled_rank: torch.Tensor  # [len(rows)]
    top_lp: torch.Tensor  # [len(rows), k]
    top_ids: torch.Tensor  # [len(rows), k]
    top_rank: torch.Tensor  # [len(rows), k]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopLogprobs:
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("sampled_ids", "sampled_lp", "sampled_rank", "top_lp", "top_ids", "top_rank")
        }
        return replace(self, **moved)

    def entries(self, num_rows: int) -> list[PositionLogprobs | None]:
        """Per batch row: the sampled token, then the top tokens (None where none were asked)."""
        result: list[PositionLogprobs | None] = [None] * num_rows
        sampled_ids, sampled_lp = self.sampled_ids.tolist(), self.sampled_lp.tolist()
        sampled_rank = self.sampled_rank.tolist()
        top_lp, top_ids, top_rank = self.top_lp.tolist(), self.top_ids.tolist(), self.top_rank.tolist()
        for r, (row, count) in enumerate(zip(self.rows, self.counts)):
            entry: PositionLogprobs = {sampled_ids[r]: Logprob(sampled_lp[r], sampled_rank[r])}
            for j in range(min(count, len(top_ids[r]))):
                entry.setdefault(top_ids[r][j], Logprob(top_lp[r][j], top_rank[r][j]))
            result[row] = entry
        return result


@dataclass
class DeviceSample:
    """A step's draws before the host reads them: token ids [rows] and the logprobs asked for."""

    token_ids: torch.Tensor
    logprobs: TopLogprobs | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DeviceSample:
        """A copy on `device`; CUDA to CPU with `non_blocking`: into pinned memory, valid once the
        stream has run the copy (wait on an event recorded after it)."""
        logprobs = None if self.logprobs is None else self.logprobs.to(device, non_blocking)
        return DeviceSample(self.token_ids.to(device, non_blocking=non_blocking), logprobs)

    def read(self) -> SamplerOutput:
        """The draws as lists, waited for on an event (`HostCopy`), which lets go of the GIL.
        `tolist()` on a device tensor waited holding it, so any other thread of the process ran
        only between steps: encode-ahead's eager tower launch took 1.92 s instead of 0.50 beside
        32 decodes on an H200, 0.44 s with this (BENCHMARKS.md, "Encode ahead")."""
        return HostCopy(self).result()

    def to_host(self) -> SamplerOutput:
        """The draws as lists (a host sync where they are on the device)."""
        num_rows = self.token_ids.shape[0]
        logprobs = [None] * num_rows if self.logprobs is None else self.logprobs.entries(num_rows)
        return SamplerOutput(self.token_ids.tolist(), logprobs)


class HostCopy:
    """A step's draws on their way to the host: copied into pinned memory without blocking, and an
    event after the copy, so that reading them waits for that step alone, not for any launched after."""

    def __init__(self, sample: DeviceSample) -> None:
        self.event: torch.cuda.Event | None = None
        if sample.token_ids.is_cuda:
            self.host = sample.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = sample  # on the CPU the draws are done when `sample` returns

    def result(self) -> SamplerOutput:
        if self.event is not None:
            self.event.synchronize()
        return self.host.to_host()


class Sampler:
    """Greedy rows take the argmax; the others sample after temperature, top-k, top-p and min-p.

    Greedy means `SamplingParams.greedy` (temperature below 1e-5, or top_k == 1); ties go to the
    lowest token id, like torch.argmax.

    Contract: `logits` is [batch, vocab] of any float dtype (computed in float32); `params` and
    `generators` have one entry per row. A row's generator (None: torch's default) drives its
    draw, so a seeded request gets the same tokens whatever else is batched with it.
    Logprobs come from the raw logits (before temperature and the masks), like vLLM's default.
    """

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        return self.sample(logits, params, generators).read()

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> DeviceSample:
        """`__call__`'s draws, left on the logits' device (nothing waits for them)."""
        if logits.dim() != 2 or not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(
                f"logits {tuple(logits.shape)} need one params and one generator per row, "
                f"got {len(params)} and {len(generators)}"
            )
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy_rows) == len(params) and all(p.logprobs is None for p in params):
            # The common decode step: argmax of the logits as they come (float32 would change
            # no order), no float32 copy of the whole [batch, vocab] block, no row gather.
            return DeviceSample(logits.argmax(dim=-1))
        logits = logits.float()
        device = logits.device
        sampled = torch.empty(logits.shape[0], dtype=torch.long, device=device)
        if len(greedy_rows) == len(params):
            sampled = logits.argmax(dim=-1)  # all greedy: no row gather (a copy of the logits)
        elif greedy_rows:
            rows = to_device(greedy_rows, device)
            sampled[rows] = logits[rows].argmax(dim=-1)
        if random_rows:
            rows = to_device(random_rows, device)
            probs = _masked_probs(logits[rows], [params[i] for i in random_rows])
            sampled[rows] = _draw(probs, [generators[i] for i in random_rows])
        return DeviceSample(sampled, _logprobs(logits, sampled, params))


def to_device(values: Sequence[int | float], device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`. To CUDA through pinned memory, without blocking:
    a copy from pageable memory may wait for the work queued on the stream (a step in flight)."""
    tensor = torch.tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _masked_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, then top-k, then top-p, then min-p; [rows, vocab], token order."""
    device = logits.device
    temperature = to_device([p.temperature for p in params], device)
    logits = logits / temperature.unsqueeze(1)
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        logits = _apply_top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        # A ratio to the max prob, so renormalisation after top-k/top-p does not change it.
        threshold = to_device(min_p, device).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set logits outside each row's top-k and nucleus to -inf (top_k 0 / top_p 1.0: no limit).

    Works on the sorted logits, then scatters back, so the result stays in token-id order.
    The nucleus is the smallest prefix (by descending prob) whose mass reaches top_p: a token is
    kept iff the mass strictly before it is < top_p, which always keeps the top token.
    """
    vocab = logits.shape[-1]
    device = logits.device
    # stable: ties keep token-id order, so which tied token survives the cut is deterministic.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    k = to_device([k if 0 < k < vocab else vocab for k in top_k], device).unsqueeze(1)
    drop = ranks >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if any(p < 1.0 for p in top_p):
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # top_p 1.0 must keep everything even where rounding pushes the cumulative mass past 1.
        p = to_device([p if p < 1.0 else float("inf") for p in top_p], device).unsqueeze(1)
        drop |= mass_before >= p
        drop[:, 0] = False  # guards against rounding when top_p is tiny
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per row with that row's generator; [rows] token ids."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for i, gen in enumerate(generators):
        out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out


def _logprobs(
    logits: torch.Tensor, sampled: torch.Tensor, params: Sequence[SamplingParams]
) -> TopLogprobs | None:
    """The sampled token's logprob and rank and the top-`logprobs` tokens of the raw distribution,
    of the rows that asked (None: no row did); `TopLogprobs.entries` reads them per row.

    Rank is 1 + the number of tokens with a strictly higher logprob (ties share a rank), for the
    sampled token too, even when it lies outside the reported top tokens.
    """
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    index = to_device(rows, logits.device)
    logprobs = torch.log_softmax(logits[index], dim=-1)
    sampled_ids = sampled[index]
    sampled_lp = logprobs.gather(1, sampled_ids.unsqueeze(1))
    sampled_rank = (logprobs > sampled_lp).sum(dim=-1) + 1
    counts = [params[i].logprobs for i in rows]
    k = min(max(counts), logprobs.shape[-1])
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    # Within sorted top-k values, tokens strictly above position j all sit before j.
    top_rank = (top_lp.unsqueeze(1) > top_lp.unsqueeze(2)).sum(dim=-1) + 1
    return TopLogprobs(rows, counts, sampled_ids, sampled_lp[:, 0], sampled_rank, top_lp, top_ids, top_rank)

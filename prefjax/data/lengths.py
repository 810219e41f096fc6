"""Token lengths shaped like a real preference dataset's, for benchmarks and packing tests.

Padding waste depends on how lengths spread, so a benchmark on fixed-length random tokens says
nothing about real data. :func:`sample_pair_lengths` draws ``(prompt, chosen, rejected)`` token
counts from a :class:`LengthProfile` fitted to published statistics:

``"hh_helpful"`` -- Anthropic HH-RLHF, helpful subset (Bai et al., 2022), as tabulated by the
Llama 2 paper (Touvron et al., 2023, arXiv:2307.09288, Table 6, "Anthropic Helpful": 122,387
comparisons, 3.0 turns per dialogue, 251.5 tokens per example, 88.4 per response, Llama
tokenizer). A DPO pair of it carries the dialogue so far as its prompt and one final response
per side, so the prompt mean is 251.5 - 88.4 = 163.1 tokens and each response's mean 88.4. The
table gives means only; the spread is ours: log-normal lengths (long right tails, as token counts
of chat data have) with ``sigma`` 1.0 for the multi-turn prompts and 0.9 for responses. The
matched quantities are the two means (checked by ``tests/data/test_packing.py`` to 3%); the
resulting quantiles, before truncation, are

=========  ======  ======  ======  ======
tokens     p10     p50     p90     p99
=========  ======  ======  ======  ======
prompt     27      99      356     1013
response   19      59      187     478
=========  ======  ======  ======  ======

(``quantiles(PROFILES["hh_helpful"])``), so a batch's longest sequence is typically 3-4x its
mean: the regime where padding wastes most of a padded batch and packing recovers it.

``"uniform"`` is the shape this project's benchmarks used before (every sequence the same
length) -- the no-waste limit, for comparison.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class LengthProfile:
    """Log-normal token-length model of one dataset (means and log-space spreads).

    Attributes:
      name: short name (``PROFILES`` key).
      source: where the matched statistics come from.
      prompt_mean, response_mean: mean tokens of a prompt and of one response.
      prompt_sigma, response_sigma: standard deviation of ``log(length)`` (0: constant length).
    """

    name: str
    source: str
    prompt_mean: float
    response_mean: float
    prompt_sigma: float
    response_sigma: float


PROFILES = {
    "hh_helpful": LengthProfile(
        name="hh_helpful",
        source=(
            "Anthropic HH-RLHF helpful (Bai et al., 2022): means from Llama 2 (Touvron et al., "
            "2023, arXiv:2307.09288) Table 6, 251.5 tokens/example, 88.4 tokens/response"
        ),
        prompt_mean=251.5 - 88.4,
        response_mean=88.4,
        prompt_sigma=1.0,
        response_sigma=0.9,
    ),
    "uniform": LengthProfile(
        name="uniform",
        source="fixed lengths (the no-padding limit)",
        prompt_mean=64.0,
        response_mean=64.0,
        prompt_sigma=0.0,
        response_sigma=0.0,
    ),
}


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    # E[exp(N(mu, sigma^2))] = exp(mu + sigma^2 / 2), so mu = log(mean) - sigma^2 / 2.
    mu = math.log(mean) - sigma**2 / 2
    return rng.lognormal(mu, sigma, n) if sigma > 0 else np.full(n, mean)


def sample_pair_lengths(
    profile: LengthProfile | str,
    num: int,
    *,
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(prompt, chosen, rejected)`` ``[num]`` int token counts of ``num`` preference pairs.

    Lengths are rounded and at least 1. With ``max_prompt_len`` a prompt keeps at most that many
    tokens; with ``max_len`` a response keeps at most ``max_len - prompt`` (the tokenizer's
    truncation: prompt first, the response cut to fit).

    Example:
      >>> p, c, r = sample_pair_lengths("uniform", 2)
      >>> p.tolist(), c.tolist(), r.tolist()
      ([64, 64], [64, 64], [64, 64])
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(
                f"unknown length profile {profile!r}; expected one of {list(PROFILES)}"
            )
        profile = PROFILES[profile]
    rng = np.random.default_rng(seed)
    draw = lambda mean, sigma: np.maximum(  # noqa: E731
        np.rint(_lognormal(rng, mean, sigma, num)), 1
    ).astype(np.int64)
    prompt = draw(profile.prompt_mean, profile.prompt_sigma)
    chosen = draw(profile.response_mean, profile.response_sigma)
    rejected = draw(profile.response_mean, profile.response_sigma)
    if max_prompt_len is not None:
        prompt = np.minimum(prompt, max_prompt_len)
    if max_len is not None:
        if max_prompt_len is None or max_prompt_len >= max_len:
            prompt = np.minimum(prompt, max_len - 1)
        chosen = np.minimum(chosen, max_len - prompt)
        rejected = np.minimum(rejected, max_len - prompt)
    return prompt, chosen, rejected


def quantiles(profile: LengthProfile, qs=(0.1, 0.5, 0.9, 0.99)) -> dict[str, list[int]]:
    """The untruncated log-normal quantiles of prompt and response lengths (for the docs)."""
    z = {0.1: -1.2815515655, 0.5: 0.0, 0.9: 1.2815515655, 0.99: 2.3263478740}

    def q(mean, sigma):
        mu = math.log(mean) - sigma**2 / 2
        return [round(math.exp(mu + sigma * z[p])) for p in qs]

    return {
        "prompt": q(profile.prompt_mean, profile.prompt_sigma),
        "response": q(profile.response_mean, profile.response_sigma),
    }

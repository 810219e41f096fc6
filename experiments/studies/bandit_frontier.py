r"""The exact reward-KL frontier of a KL-regularised bandit (no flags: importable anywhere).

For a bandit with rewards :math:`r(x, y)` and a reference :math:`\pi_{ref}` over its arms, the
frontier :math:`F(k) = \max\{E_\pi[r] : KL(\pi\|\pi_{ref}) \le k\}` (prompt means of both) is
reached by the Gibbs policy :math:`\pi^*_\beta \propto \pi_{ref} e^{r/\beta}` whose KL is ``k``:
the maximiser of the Lagrangian :math:`E_\pi[r] - \beta\,KL(\pi\|\pi_{ref})` (one ``beta``
shared by all prompts, since the constraint is on the mean KL). So no policy lies above the curve
:math:`\beta \mapsto (KL(\pi^*_\beta\|\pi_{ref}), E_{\pi^*_\beta}[r])`, which rises
monotonically from the reference (``beta -> inf``) to the best arm (``beta -> 0``).
"""

from __future__ import annotations

import numpy as np


def frontier_curve(bandit, ref_logprobs, betas) -> tuple[np.ndarray, np.ndarray]:
    r"""``(kl [n], reward [n])`` of :math:`\pi^*_\beta` for each of ``betas`` (prompt means)."""
    kls, rewards = [], []
    for beta in betas:
        pi = bandit.optimal_policy(float(beta), ref_logprobs)
        kls.append(bandit.kl_to_reference(pi, ref_logprobs).mean())
        rewards.append(bandit.expected_reward(pi).mean())
    return np.asarray(kls), np.asarray(rewards)


def greedy_kl(bandit, ref_logprobs) -> float:
    r"""The frontier's largest KL, :math:`\lim_{\beta\to 0}`: the best arm of every prompt,
    :math:`-\log\pi_{ref}(y^*|x)` (prompt mean). Beyond it the frontier is flat at
    :math:`\max_y r`."""
    ref = np.asarray(ref_logprobs, np.float64)
    best = bandit.rewards.argmax(-1)
    return float(-ref[np.arange(len(best)), best].mean())


def frontier_reward_at(bandit, ref_logprobs, kl: float, *, iters: int = 80) -> float:
    r"""The exact frontier :math:`F(k) = \max\{E_\pi[r] : KL(\pi\|\pi_{ref}) \le k\}` at ``kl``.

    :math:`F(0) = E_{\pi_{ref}}[r]`; for :math:`0 < k <` :func:`greedy_kl` it is the reward of
    the :math:`\pi^*_\beta` whose KL is ``k`` (``KL(pi*_beta)`` falls monotonically in
    ``beta``: bisection on ``log beta`` in ``[1e-6, 1e6]``); beyond, :math:`\max_y r`.
    """
    if kl <= 0:
        ref = np.asarray(ref_logprobs, np.float64)
        ref = np.exp(ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True))
        return float(bandit.expected_reward(ref).mean())
    if kl >= greedy_kl(bandit, ref_logprobs):
        return float(bandit.rewards.max(-1).mean())
    lo, hi = np.log(1e-6), np.log(1e6)  # KL(lo) >= kl >= KL(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        k_mid, _ = frontier_curve(bandit, ref_logprobs, [np.exp(mid)])
        lo, hi = (mid, hi) if k_mid[0] > kl else (lo, mid)
    _, reward = frontier_curve(bandit, ref_logprobs, [np.exp(hi)])
    return float(reward[0])

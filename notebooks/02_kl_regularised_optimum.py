# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The KL-regularised objective and its optimum
#
# **Derived here.** RLHF's second stage maximises, for each prompt $x$,
#
# $$J_\beta(\pi) = \mathbb{E}_{y\sim\pi(\cdot\mid x)}\big[r(x,y)\big]
#   - \beta\,\mathrm{KL}\big(\pi(\cdot\mid x)\,\|\,\pi_{\text{ref}}(\cdot\mid x)\big).$$
#
# We show that its maximiser is, in closed form,
#
# $$\pi^*(y\mid x) = \frac{1}{Z(x)}\,\pi_{\text{ref}}(y\mid x)\,e^{r(x,y)/\beta},\qquad
#   Z(x) = \sum_y \pi_{\text{ref}}(y\mid x)\,e^{r(x,y)/\beta},$$
#
# check it on the built-in bandit (`prefjax.data.tasks.Bandit`, whose arms are single-token
# responses with known rewards and reference probabilities) against a direct numerical
# maximisation for several $\beta$, and look at the two limits: $\beta\to 0$ (greedy on $r$) and
# $\beta\to\infty$ (the reference). This closed form is what DPO (notebook 03) inverts.

# %% [markdown]
# ## Setup

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import prefjax.losses as L
from prefjax.data.tasks import Bandit

bandit = Bandit.make(num_arms=8, num_prompts=3, seed=0)
rewards = bandit.rewards  # [P, K] r(x, y)
ref_logprobs = bandit.ref_logprobs  # [P, K] log pi_ref(y | x)
P, K = rewards.shape
print("arms:", bandit.arms)
print("rewards (prompt 0):", np.round(rewards[0], 2))
print("pi_ref  (prompt 0):", np.round(np.exp(ref_logprobs[0]), 3))


def exact_kl(probs, ref):
    """KL(pi || ref) = E_{y ~ pi}[k1(y)], the expectation taken exactly over all arms."""
    probs = jnp.asarray(probs)
    ref = jnp.broadcast_to(jnp.asarray(ref, probs.dtype), probs.shape)
    k1 = L.kl_estimate(jnp.log(probs), ref, kind="k1")  # [..., K] log pi - log ref
    return jnp.sum(probs * k1, axis=-1)


# %% [markdown]
# ## 1. Completing the KL
#
# Write the objective as a single expectation and pull the reward inside the logarithm:
#
# $$J_\beta(\pi) = \sum_y \pi(y)\Big[r(y) - \beta\log\frac{\pi(y)}{\pi_{\text{ref}}(y)}\Big]
#   = -\beta\sum_y\pi(y)\log\frac{\pi(y)}{\pi_{\text{ref}}(y)\,e^{r(y)/\beta}}
#   = -\beta\sum_y\pi(y)\log\frac{\pi(y)}{\pi^*(y)} + \beta\log Z.$$
#
# (The last step multiplies and divides by $Z$; $\sum_y\pi(y) = 1$ turns $\log Z$ into a
# constant.) So
#
# $$J_\beta(\pi) = \beta\log Z - \beta\,\mathrm{KL}(\pi\,\|\,\pi^*).$$
#
# $Z$ does not depend on $\pi$ and a KL is $\ge 0$ with equality only at $\pi = \pi^*$: the
# maximiser is $\pi^*$ and the maximum is $\beta\log Z$. Numerically, for 200 random policies,
# with `Bandit.objective` and `Bandit.optimal_policy` on one side and the right-hand side built
# from the library's KL on the other:

# %%
rng = np.random.default_rng(0)
beta = 0.5
pi_star = bandit.optimal_policy(beta)  # [P, K]
log_z = np.log(np.sum(np.exp(ref_logprobs + rewards / beta), axis=-1))  # [P]

random_pis = rng.dirichlet(np.ones(K), size=(200, P))  # [200, P, K]
lhs = np.stack([bandit.objective(pi, beta) for pi in random_pis])  # [200, P]
rhs = beta * log_z - beta * np.asarray(exact_kl(random_pis, np.log(pi_star)))
np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)

# The optimum attains beta log Z, and every random policy falls short of it.
np.testing.assert_allclose(bandit.objective(pi_star, beta), beta * log_z, rtol=1e-10)
assert np.all(lhs < beta * log_z)
# pi* is pi_ref tilted by exp(r / beta): its log-ratio to pi_ref is r / beta - log Z.
np.testing.assert_allclose(
    np.log(pi_star) - ref_logprobs, rewards / beta - log_z[:, None], atol=1e-10
)
print(
    "max J over random policies:",
    np.round(lhs.max(0), 4),
    "  beta log Z:",
    np.round(beta * log_z, 4),
)

# %% [markdown]
# ## 2. Direct numerical maximisation reaches the closed form
#
# Forget the derivation and just climb $J_\beta$: parameterise $\pi = \mathrm{softmax}(\theta)$,
# start at $\pi_{\text{ref}}$ and run Adam on $-J_\beta$ — the same objective RLHF's PPO stage
# optimises with samples, here with exact expectations. One jitted call optimises all prompts for
# five values of $\beta$ at once (`vmap` over $\beta$, `lax.scan` over 3,000 steps).

# %%
betas = np.array([0.1, 0.3, 1.0, 3.0, 10.0])


def neg_objective(theta, beta):
    pi = jax.nn.softmax(theta, axis=-1)
    return -jnp.sum(jnp.sum(pi * rewards, -1) - beta * exact_kl(pi, ref_logprobs))


@jax.jit
@jax.vmap
def maximise(beta):
    opt = optax.adam(0.05)
    theta = jnp.asarray(ref_logprobs, jnp.float32)

    def step(carry, _):
        theta, state = carry
        grads = jax.grad(neg_objective)(theta, beta)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), length=3000)
    return jax.nn.softmax(theta, axis=-1)


numerical = np.asarray(maximise(jnp.asarray(betas, jnp.float32)))  # [beta, P, K]
for b, pi_num in zip(betas, numerical, strict=True):
    closed = bandit.optimal_policy(b)
    np.testing.assert_allclose(pi_num, closed, atol=2e-3)
    np.testing.assert_allclose(bandit.objective(pi_num, b), bandit.objective(closed, b), atol=1e-4)
    print(f"beta = {b:5.1f}: max |pi_numerical - pi*| = {np.abs(pi_num - closed).max():.1e}")

# %% [markdown]
# The closed form is also a stationary point of the objective in logit space (the gradient there
# vanishes), while the reference policy, for any finite $\beta$, is not:

# %%
grad_fn = jax.jit(jax.grad(neg_objective))
g_star = grad_fn(jnp.log(jnp.asarray(pi_star, jnp.float32)), beta)
g_ref = grad_fn(jnp.asarray(ref_logprobs, jnp.float32), beta)
np.testing.assert_allclose(g_star, 0.0, atol=1e-5)
assert np.abs(g_ref).max() > 0.1

# %% [markdown]
# ## 3. The limits $\beta \to 0$ and $\beta \to \infty$
#
# $\log\pi^*(y) = \log\pi_{\text{ref}}(y) + r(y)/\beta - \log Z$. As $\beta\to 0$ the reward
# term dominates and all mass goes to $\arg\max_y r(y)$ — unregularised reward maximisation,
# which ignores $\pi_{\text{ref}}$ entirely (and, with a learned reward, is where reward hacking
# lives; see notebook 06). As $\beta\to\infty$ the reward term vanishes and
# $\pi^* = \pi_{\text{ref}}$. In between, $\beta$ trades expected reward against KL: both fall
# monotonically as $\beta$ grows, tracing the best achievable reward at each KL budget.

# %%
pi_cold = bandit.optimal_policy(1e-3)
pi_hot = bandit.optimal_policy(1e4)
np.testing.assert_array_equal(pi_cold.argmax(-1), rewards.argmax(-1))
assert np.all(pi_cold.max(-1) > 0.999)
np.testing.assert_allclose(bandit.expected_reward(pi_cold), rewards.max(-1), atol=1e-3)
np.testing.assert_allclose(pi_hot, np.exp(ref_logprobs), atol=1e-3)
np.testing.assert_allclose(bandit.kl_to_reference(pi_hot), 0.0, atol=1e-6)

beta_grid = np.geomspace(1e-2, 1e2, 60)
frontier = np.array(
    [
        [
            bandit.expected_reward(bandit.optimal_policy(b))[0],
            bandit.kl_to_reference(bandit.optimal_policy(b))[0],
        ]
        for b in beta_grid
    ]
)
assert np.all(np.diff(frontier[:, 0]) < 0) and np.all(np.diff(frontier[:, 1]) < 0)

# %% [markdown]
# Every other policy lies below this frontier: at its own KL, $\pi^*_\beta$ has the highest
# expected reward (a policy with the same KL and more reward would have a larger $J_\beta$).

# %%
others = rng.dirichlet(np.ones(K) * 0.5, size=2000)  # [2000, K] random policies for prompt 0
o_reward = others @ rewards[0]
o_kl = np.asarray(exact_kl(others, ref_logprobs[0]))
# Interpolate the frontier's reward at each random policy's KL and compare.
order = np.argsort(frontier[:, 1])
best_at_kl = np.interp(o_kl, frontier[order, 1], frontier[order, 0])
inside = o_kl < frontier[:, 1].max()
assert np.all(o_reward[inside] <= best_at_kl[inside] + 1e-3)

pi_curves = np.stack([bandit.optimal_policy(b)[0] for b in beta_grid])  # [beta, K]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for k in np.argsort(-rewards[0]):
    axes[0].plot(beta_grid, pi_curves[:, k], label=f"{bandit.arms[k]}: r = {rewards[0, k]:+.2f}")
axes[0].set_xscale("log")
axes[0].set(
    xlabel=r"$\beta$",
    ylabel=r"$\pi^*(y)$",
    title=r"$\pi^*$ from greedy ($\beta\to0$) to $\pi_{ref}$",
)
axes[0].legend(fontsize=7, ncol=2)
axes[1].scatter(o_kl, o_reward, s=3, c="0.7", label="random policies")
axes[1].plot(
    frontier[:, 1], frontier[:, 0], "C3", lw=2, label=r"$\pi^*_\beta$, $\beta \in [0.01, 100]$"
)
axes[1].set(
    xlabel=r"KL$(\pi \| \pi_{ref})$", ylabel=r"$E_\pi[r]$", title="Reward-KL frontier (prompt 0)"
)
axes[1].set_xlim(0, frontier[:, 1].max() * 1.1)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Summary.** The KL-regularised objective is a KL to a tilted distribution in disguise,
# $J_\beta(\pi) = \beta\log Z - \beta\,\mathrm{KL}(\pi\,\|\,\pi^*)$, so its unique maximiser is
# $\pi^* \propto \pi_{\text{ref}}\,e^{r/\beta}$ — verified here against gradient ascent for five
# values of $\beta$. The closed form needs $Z(x)$, a sum over every possible response, which is
# intractable for a language model; notebook 03 shows how DPO gets rid of it.

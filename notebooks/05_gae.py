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
# # 05 · Generalized Advantage Estimation
#
# **Derived here.** The policy gradient needs an advantage $A(s_t, a_t)$ for every action. We
# build the estimator used by PPO from the one-step TD residual $\delta_t$, through the $k$-step
# estimators $\hat A^{(k)}_t$, to their exponentially weighted average, and show that this
# average collapses to the recursion
#
# $$\hat A_t = \delta_t + \gamma\lambda\,\hat A_{t+1}.$$
#
# Each step is checked against `prefjax.losses.gae`: against the explicit sum, at the limits
# $\lambda = 0$ (TD error) and $\lambda = 1$ (Monte Carlo return minus value), on padded batches,
# and on a small Markov decision process whose true advantages we know, where we *measure* the
# bias–variance trade-off that $\lambda$ controls. Finally we look at the `lax.scan` inside `gae`
# and time it against Python loops.

# %% [markdown]
# ## Setup

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import prefjax.losses as L

rng = np.random.default_rng(0)
# The library computes in float32; references below are float64 NumPy.
TOL = dict(rtol=1e-5, atol=1e-5)
# Library functions are not jitted (the caller jits once). gamma and lam are traced, so changing
# them does not recompile; only a new batch shape does.
gae = jax.jit(L.gae)

# %% [markdown]
# ## 1. The TD residual
#
# A critic $V$ estimates the expected discounted return from a state. After acting in $s_t$ we
# see the reward $r_t$ and the next state $s_{t+1}$; the *temporal-difference residual*
#
# $$\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t)$$
#
# is a one-step advantage estimate: $\mathbb{E}[\delta_t \mid s_t, a_t] = Q(s_t, a_t) - V(s_t)$
# when $V$ is exact. For a response of $T$ tokens the episode ends after token $T-1$, so
# $V(s_T) = 0$. With $\lambda = 0$, `gae` returns exactly $\delta_t$.

# %%
T, gamma = 6, 0.9
r = rng.normal(size=T)
v = rng.normal(size=T)
v_next = np.append(v[1:], 0.0)  # V(s_T) = 0: the response has ended
delta = r + gamma * v_next - v

ones = np.ones((1, T))
adv0, ret0 = gae(r[None], v[None], ones, gamma=gamma, lam=0.0)
np.testing.assert_allclose(adv0[0], delta, **TOL)
np.testing.assert_allclose(ret0[0], r + gamma * v_next, **TOL)  # TD(0) value targets
print("delta =", np.round(delta, 4))

# %% [markdown]
# ## 2. The $k$-step estimators
#
# Looking $k$ rewards ahead before trusting the critic gives
#
# $$\hat A^{(k)}_t = \sum_{i=0}^{k-1}\gamma^i r_{t+i} + \gamma^k V(s_{t+k}) - V(s_t)
#   = \sum_{i=0}^{k-1}\gamma^i \delta_{t+i},$$
#
# the second form because the sum of residuals telescopes: each intermediate
# $\gamma^{i}V(s_{t+i})$ appears once with $+$ and once with $-$. Small $k$ leans on the critic
# (biased when $V$ is wrong); large $k$ sums many random rewards (high variance). Once $t+k$
# reaches the end, $\hat A^{(k)}_t$ is the Monte Carlo return minus the value. We check the
# telescoping identity for every $t$ and $k$, and the Monte Carlo end point against
# `discounted_returns`.

# %%
v_ext = np.append(v, 0.0)  # V(s_t) for t = 0..T


def k_step(t, k):
    """A^(k)_t from rewards and one bootstrap value (k capped at the episode end)."""
    k = min(k, T - t)
    return sum(gamma**i * r[t + i] for i in range(k)) + gamma**k * v_ext[t + k] - v_ext[t]


for t in range(T):
    for k in range(1, T - t + 1):
        telescoped = sum(gamma**i * delta[t + i] for i in range(k))
        np.testing.assert_allclose(k_step(t, k), telescoped, rtol=1e-12)

mc_returns = L.discounted_returns(r[None], ones, gamma=gamma)[0]
np.testing.assert_allclose([k_step(t, T) for t in range(T)], mc_returns - v, **TOL)
print("A^(k)_0 for k = 1..T:", np.round([k_step(0, k) for k in range(1, T + 1)], 4))

# %% [markdown]
# ## 3. The exponentially weighted average
#
# GAE averages all $k$-step estimators with geometric weights $(1-\lambda)\lambda^{k-1}$, which
# sum to 1:
#
# $$\hat A^{\mathrm{GAE}(\gamma,\lambda)}_t = (1-\lambda)\sum_{k\ge 1}\lambda^{k-1}\hat A^{(k)}_t
#   = (1-\lambda)\sum_{k\ge1}\lambda^{k-1}\sum_{i<k}\gamma^i\delta_{t+i}
#   = \sum_{i\ge 0}(\gamma\lambda)^i\,\delta_{t+i}.$$
#
# The last step swaps the sums: $\delta_{t+i}$ appears in every $\hat A^{(k)}$ with $k > i$, and
# $(1-\lambda)\sum_{k>i}\lambda^{k-1} = \lambda^i$. On a finite episode $\hat A^{(k)}_t$ stops
# changing at $k = T - t$, so the tail weights $\lambda^{T-t-1}$ all land on the Monte Carlo
# estimator. Below: the weighted average computed literally, the $(\gamma\lambda)$-discounted
# sum of residuals, and `gae` agree.

# %%
lam = 0.8
weighted = []
for t in range(T):
    n = T - t  # A^(k)_t is constant for k >= n
    head = sum((1 - lam) * lam ** (k - 1) * k_step(t, k) for k in range(1, n))
    weighted.append(head + lam ** (n - 1) * k_step(t, n))
discounted_deltas = [sum((gamma * lam) ** i * delta[t + i] for i in range(T - t)) for t in range(T)]
adv, ret = gae(r[None], v[None], ones, gamma=gamma, lam=lam)

np.testing.assert_allclose(weighted, discounted_deltas, rtol=1e-12)
np.testing.assert_allclose(adv[0], weighted, **TOL)
np.testing.assert_allclose(ret[0], adv[0] + v, **TOL)  # returns are the lambda-returns A + V
print("GAE(0.9, 0.8) =", np.round(np.asarray(adv[0]), 4))

# %% [markdown]
# ## 4. The recursion
#
# Splitting off the first term of $\sum_{i\ge0}(\gamma\lambda)^i\delta_{t+i}$ leaves $\gamma\lambda$
# times the same sum started at $t+1$:
#
# $$\hat A_t = \delta_t + \gamma\lambda\,\hat A_{t+1}, \qquad \hat A_{T} = 0.$$
#
# One backward pass over time computes every advantage in $O(T)$ instead of $O(T^2)$. The output
# of `gae` satisfies the recursion, and its two limits are the TD error ($\lambda=0$) and, with
# $\gamma = \lambda = 1$ and a zero critic, the plain reward-to-go.

# %%
a = np.asarray(adv[0])
np.testing.assert_allclose(a[:-1], delta[:-1] + gamma * lam * a[1:], **TOL)
np.testing.assert_allclose(a[-1], delta[-1], **TOL)

adv_mc, ret_mc = gae(r[None], np.zeros((1, T)), ones, gamma=1.0, lam=1.0)
np.testing.assert_allclose(adv_mc[0], np.cumsum(r[::-1])[::-1], **TOL)  # sum_{t' >= t} r_t'
np.testing.assert_allclose(ret_mc[0], adv_mc[0], **TOL)

# %% [markdown]
# ## 5. Batches of responses: masks and padding
#
# In RLHF the batch holds responses of different lengths, right-padded to a common $T$. The mask
# marks real tokens; the value after the last real token is 0 (the response ended), padding must
# contribute nothing, and a row's advantages must not depend on how much padding follows it. An
# independent reference — the explicit double sum $\sum_i(\gamma\lambda)^i\delta_{t+i}$ over the
# real tokens of each row — against `gae` under `jax.jit`, with garbage in the padding:

# %%
B, T_max, gamma, lam = 8, 12, 0.97, 0.9
lengths = rng.integers(1, T_max + 1, size=B)
mask = (np.arange(T_max)[None] < lengths[:, None]).astype(np.float32)
rewards = rng.normal(size=(B, T_max)).astype(np.float32)
values = rng.normal(size=(B, T_max)).astype(np.float32)
rewards_padded = np.where(mask > 0, rewards, 1e3)  # garbage where masked
values_padded = np.where(mask > 0, values, -1e3)


def explicit_gae(r, v, n, gamma, lam):
    """sum_i (gamma lam)^i delta_{t+i} over the first n entries, with V(s_n) = 0."""
    v = np.append(v[:n], 0.0)
    d = r[:n] + gamma * v[1:] - v[:-1]
    out = np.zeros(len(r))
    out[:n] = [sum((gamma * lam) ** i * d[t + i] for i in range(n - t)) for t in range(n)]
    return out


adv_b, ret_b = gae(rewards_padded, values_padded, mask, gamma=gamma, lam=lam)
want = np.stack([explicit_gae(rewards[b], values[b], lengths[b], gamma, lam) for b in range(B)])
np.testing.assert_allclose(adv_b, want, **TOL)
np.testing.assert_array_equal(np.asarray(adv_b)[mask == 0], 0.0)  # padding outputs 0

# Cutting the padding off a row changes nothing.
b = int(np.argmin(lengths))
n = int(lengths[b])
adv_short, _ = L.gae(  # eager, on the unpadded row
    rewards[b : b + 1, :n], values[b : b + 1, :n], mask[b : b + 1, :n], gamma=gamma, lam=lam
)
np.testing.assert_allclose(adv_b[b, :n], adv_short[0], **TOL)
print("lengths:", lengths)

# %% [markdown]
# ## 6. Bias and variance, measured
#
# Why not always take $\lambda = 1$? Because the variance of $\hat A_t$ grows with the number of
# random rewards it sums, while its bias comes only from the critic's errors, which $\lambda$
# shrinks.
# To *measure* this we need the true advantages, so we take a small finite-horizon MDP that we can
# solve exactly: $S = 5$ states, 2 actions, random transition probabilities $P(s'\mid s,a)$ and mean
# rewards $R(s, a)$ with Gaussian noise, a fixed stochastic policy $\pi$, horizon $T = 10$,
# $\gamma = 0.95$. Backward induction gives
#
# $$Q_t(s,a) = R(s,a) + \gamma\sum_{s'}P(s'\mid s,a)\,V_{t+1}(s'), \quad
#   V_t(s) = \sum_a \pi(a\mid s)\,Q_t(s,a), \quad V_T = 0,$$
#
# and the true advantage $A_t(s,a) = Q_t(s,a) - V_t(s)$.
#
# The critic is wrong: $\hat V_t(s) = V_t(s) + e_t(s)$ with a fixed random error $e$ (but exact at
# the start state $s_0$, so that what we measure at $t = 0$ is the error GAE controls, from
# bootstrapping the *future*). Taking expectations of $\hat A_0 = \sum_l(\gamma\lambda)^l\delta_l$
# term by term, $\mathbb{E}[\delta_0\mid a_0] = A_0(s_0,a_0) + \gamma\,\mathbb{E}[e_1(s_1)]$ and
# $\mathbb{E}[\delta_l\mid a_0] = \gamma\,\mathbb{E}[e_{l+1}(s_{l+1})] - \mathbb{E}[e_l(s_l)]$ for
# $l \ge 1$, so
#
# $$\mathrm{bias}(\lambda \mid a_0) = \mathbb{E}[\hat A_0\mid a_0] - A_0(s_0,a_0)
#   = (1-\lambda)\sum_{l=1}^{T-1}\gamma^l\lambda^{l-1}\,\mathbb{E}[e_l(s_l)\mid s_0, a_0],$$
#
# which vanishes at $\lambda = 1$ whatever the critic. We predict it exactly by propagating the
# state distribution, and compare with the bias measured from 20,000 sampled episodes fed to `gae`.

# %%
S, A_, T, gamma, s0 = 5, 2, 10, 0.95, 0
P = rng.dirichlet(np.ones(S), size=(S, A_))  # [S, A, S']
R = rng.normal(size=(S, A_))
reward_noise = 1.0
pi = rng.dirichlet(np.ones(A_), size=S)  # [S, A]

Q = np.zeros((T, S, A_))
V = np.zeros((T + 1, S))
for t in reversed(range(T)):
    Q[t] = R + gamma * P @ V[t + 1]
    V[t] = (pi * Q[t]).sum(-1)
A_true = Q - V[:T, :, None]

err = rng.normal(scale=1.0, size=(T, S))
err[0, s0] = 0.0  # exact at the start state
V_hat = np.concatenate([V[:T] + err, np.zeros((1, S))])  # V_hat_T = 0 (episode over)

# Predicted bias: E[e_l(s_l) | s0, a0] by propagating the state distribution under pi.
P_pi = np.einsum("sa,sat->st", pi, P)  # [S, S'] one-step transition under the policy
expected_err = np.zeros((A_, T))  # [a0, l]
for a0 in range(A_):
    dist = P[s0, a0]  # distribution of s_1
    for step in range(1, T):
        expected_err[a0, step] = dist @ err[step]
        dist = dist @ P_pi


def predicted_bias(lam):
    weights = np.array([(1 - lam) * gamma**j * lam ** (j - 1) for j in range(1, T)])
    return expected_err[:, 1:] @ weights  # [a0]


# Sample episodes from s0 under pi.
E = 20_000
states = np.zeros((E, T), dtype=int)
actions = np.zeros((E, T), dtype=int)
states[:, 0] = s0
for t in range(T):
    u = rng.random(E)
    actions[:, t] = (u[:, None] > np.cumsum(pi[states[:, t]], -1)).sum(-1)
    if t + 1 < T:
        u = rng.random(E)
        cdf = np.cumsum(P[states[:, t], actions[:, t]], -1)
        states[:, t + 1] = np.minimum((u[:, None] > cdf).sum(-1), S - 1)
ep_rewards = R[states, actions] + reward_noise * rng.normal(size=(E, T))
ep_values = V_hat[np.arange(T)[None], states]  # critic's value of each visited state
ep_mask = np.ones((E, T), np.float32)

lams = np.linspace(0.0, 1.0, 11)
# All lambdas in one compiled call: vmap over lambda.
adv_all = jax.jit(
    jax.vmap(lambda lam: L.gae(ep_rewards, ep_values, ep_mask, gamma=gamma, lam=lam))
)(jnp.asarray(lams, jnp.float32)).advantages  # [lambda, episode, T]
bias_sq, variance = [], []
for i, lam in enumerate(lams):
    adv0 = np.asarray(adv_all[i, :, 0])
    a0 = actions[:, 0]
    p_a = np.array([np.mean(a0 == a) for a in range(A_)])
    mean_a = np.array([adv0[a0 == a].mean() for a in range(A_)])
    var_a = np.array([adv0[a0 == a].var() for a in range(A_)])
    se_a = np.sqrt(var_a / np.array([np.sum(a0 == a) for a in range(A_)]))
    b = mean_a - A_true[0, s0]
    # Measured bias agrees with the prediction within 4 standard errors.
    np.testing.assert_array_less(np.abs(b - predicted_bias(lam)), 4 * se_a + 1e-6)
    bias_sq.append(p_a @ b**2)
    variance.append(p_a @ var_a)
bias_sq, variance = np.array(bias_sq), np.array(variance)
mse = bias_sq + variance
print(" lambda  bias^2  variance  mse")
for row in zip(lams, bias_sq, variance, mse, strict=True):
    print("  {:.1f}   {:.4f}  {:.4f}   {:.4f}".format(*row))

# %% [markdown]
# The measured curves show the trade-off. The bias shrinks to (statistically) zero at
# $\lambda = 1$. The variance is nearly flat for small $\lambda$ — the critic's error at the random
# next state is itself a source of spread, and leaning on it less at first removes about as much
# as the extra rewards add — then grows steeply as more and more noisy rewards are summed. Their
# sum is smallest in between: the reason RLHF recipes pick an intermediate $\lambda$ rather than
# either end (the best value depends on how good the critic is and how noisy the rewards are).

# %%
assert bias_sq[0] > 10 * bias_sq[-1]  # the critic's error dominates at lambda = 0
assert variance[-1] > 5 * variance[0]  # full Monte Carlo lookahead: far more variance
assert np.all(np.diff(variance[lams >= 0.3]) > 0)  # and steadily growing beyond small lambda
best = int(np.argmin(mse))
assert 0 < best < len(lams) - 1, "MSE should be minimised at an intermediate lambda"

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.plot(lams, bias_sq, "o", label="bias$^2$ (measured)")
ax.plot(lams, [p_a @ predicted_bias(x) ** 2 for x in lams], "C0-", label="bias$^2$ (predicted)")
ax.plot(lams, variance, "s-", label="variance")
ax.plot(lams, mse, "k^-", label="MSE")
ax.set_yscale("log")
ax.set(xlabel=r"$\lambda$", ylabel=r"error of $\hat A_0$", title="GAE on a small MDP")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 7. The `lax.scan` inside `gae`, and its speed
#
# The recursion is sequential in $t$, but every row of the batch is independent. `gae` computes
# all residuals $\delta$ at once, then runs one reverse `jax.lax.scan` over time whose body
# updates a whole `[batch]` vector: XLA compiles a single loop instead of one operation per token.
# The traced program contains that scan:

# %%
r_big = rng.normal(size=(256, 256)).astype(np.float32)
v_big = rng.normal(size=(256, 256)).astype(np.float32)
m_big = np.ones((256, 256), np.float32)
jaxpr = jax.make_jaxpr(lambda r, v, m: L.gae(r, v, m, gamma=1.0, lam=0.95))(r_big, v_big, m_big)
scans = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
assert len(scans) == 1 and scans[0].params["reverse"], "one reverse scan over time"
print("scan length:", scans[0].params["length"])

# %% [markdown]
# Timing a `[256, 256]` batch: the jitted `gae` against the recursion written as a Python loop over
# time (vectorised over the batch with NumPy), and as a plain Python loop over every token. All
# three agree.


# %%
def python_loop(r, v, gamma, lam):
    B, T = len(r), len(r[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            nxt = v[b][t + 1] if t + 1 < T else 0.0
            acc = r[b][t] + gamma * nxt - v[b][t] + gamma * lam * acc
            out[b][t] = acc
    return np.array(out)


def numpy_loop(r, v, gamma, lam):
    out = np.zeros_like(r)
    acc = np.zeros(r.shape[0], r.dtype)
    nxt = np.zeros(r.shape[0], r.dtype)
    for t in reversed(range(r.shape[1])):
        acc = r[:, t] + gamma * nxt - v[:, t] + gamma * lam * acc
        out[:, t], nxt = acc, v[:, t]
    return out


def best_of(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


jitted = lambda r, v, m: gae(r, v, m, gamma=1.0, lam=0.95).advantages  # the jitted gae of Setup
jitted(r_big, v_big, m_big).block_until_ready()  # compile once
t_jit = best_of(lambda: jitted(r_big, v_big, m_big).block_until_ready())
t_np = best_of(lambda: numpy_loop(r_big, v_big, 1.0, 0.95))
r_list, v_list = r_big.tolist(), v_big.tolist()
t_py = best_of(lambda: python_loop(r_list, v_list, 1.0, 0.95), repeats=2)

np.testing.assert_allclose(
    jitted(r_big, v_big, m_big), numpy_loop(r_big, v_big, 1.0, 0.95), rtol=1e-4, atol=1e-4
)
np.testing.assert_allclose(
    python_loop(r_list, v_list, 1.0, 0.95),
    numpy_loop(r_big, v_big, 1.0, 0.95),
    rtol=1e-4,
    atol=1e-4,
)
print(f"jitted gae (lax.scan): {1e3 * t_jit:7.3f} ms")
print(f"NumPy loop over time:  {1e3 * t_np:7.3f} ms")
print(f"Python loop per token: {1e3 * t_py:7.3f} ms")
assert t_jit < t_py / 4

# %% [markdown]
# The scan runs the whole batch in one compiled loop; the per-token Python loop pays interpreter
# overhead $B \times T$ times. The gap grows with the batch, and under `jit` the scan fuses with
# the rest of the PPO update (the residuals, the value loss) — which is why the library's PPO
# update nests it inside one jitted function rather than computing advantages on the host.

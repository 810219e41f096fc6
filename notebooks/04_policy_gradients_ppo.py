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
# # 04 · From policy gradients to PPO
#
# **Derived here.** The gradient of an expected reward,
# $\nabla_\theta\,\mathbb{E}_{\tau\sim\pi_\theta}[R(\tau)]$, written as an expectation we
# can sample (the log-derivative trick); the two variance reductions every RLHF implementation
# uses (reward-to-go and a baseline); and the pieces of the PPO loss — the clipped surrogate, the
# clipped value loss, the entropy bonus.
#
# Everything runs on a problem small enough to solve exactly: a "language model" that writes
# $T = 3$ tokens from a vocabulary of $V = 3$, so there are only 27 sequences and the true
# gradient is one `jax.grad` of an exact sum. Monte Carlo estimates built from
# `prefjax.losses.reinforce_loss` are checked against it, and `ppo_policy_loss`, `value_loss`,
# `entropy` against their formulas.

# %% [markdown]
# ## Setup

# %%
import itertools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import prefjax.losses as L

rng = np.random.default_rng(0)
TOL = dict(rtol=1e-5, atol=1e-6)
# prefjax's losses are pure and unjitted: the caller jits once, as a train step does. Compiling a
# whole call is cheaper than running it eagerly op by op, so the cells below jit what they call.

# %% [markdown]
# ## 1. A small sequential problem
#
# The state before token $t$ is the previous token (or a start symbol), the action is the next
# token, and the policy is a table of logits $\theta[t, s_t, a]$, the tabular analogue of an LM's
# next-token head. Every step earns a reward $r_t(s_t, a_t)$, so the return of a sequence is
# $R(\tau) = \sum_t r_t$. The log-probability of a sequence is the sum of the token
# log-probabilities, which `prefjax.losses.token_logprobs` reads off the logits exactly as it does
# for a transformer's `[batch, seq, vocab]` output.

# %%
T, V = 3, 3
START = V  # the state before the first token
theta0 = jnp.asarray(rng.normal(scale=0.7, size=(T, V + 1, V)), jnp.float32)
reward_table = rng.uniform(0.0, 1.0, size=(T, V + 1, V)) + 1.0  # r_t(s_t, a_t), all positive

all_seqs = np.array(list(itertools.product(range(V), repeat=T)))  # [27, T]


def states_of(seqs):
    """[N, T] tokens -> [N, T] states (the previous token, START before the first)."""
    return np.concatenate([np.full((len(seqs), 1), START), seqs[:, :-1]], axis=1)


def logits_of(theta, seqs):
    """[N, T, V] next-token logits that produced each token of seqs."""
    states = jnp.concatenate([jnp.full((seqs.shape[0], 1), START), seqs[:, :-1]], axis=1)
    return theta[jnp.arange(T)[None, :], states]


def step_rewards(seqs):
    return reward_table[np.arange(T)[None, :], states_of(seqs), seqs]  # [N, T]


all_rewards = step_rewards(all_seqs)


def expected_return(theta):
    """J(theta) = sum_tau P(tau) R(tau), exactly, over all 27 sequences."""
    logp = L.token_logprobs(logits_of(theta, all_seqs), all_seqs).sum(-1)  # [27]
    return jnp.sum(jnp.exp(logp) * all_rewards.sum(-1))


expected_return_and_grad = jax.jit(jax.value_and_grad(expected_return))
j0, exact_grad = expected_return_and_grad(theta0)
probs = jax.jit(lambda th: jnp.exp(L.token_logprobs(logits_of(th, all_seqs), all_seqs).sum(-1)))(
    theta0
)
np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)  # a distribution over sequences
print(f"J(theta0) = {float(j0):.4f}")

# %% [markdown]
# ## 2. The log-derivative trick
#
# $$\nabla_\theta J = \nabla_\theta\sum_\tau P_\theta(\tau)R(\tau)
#   = \sum_\tau P_\theta(\tau)\,\nabla_\theta\log P_\theta(\tau)\,R(\tau)
#   = \mathbb{E}_{\tau\sim\pi_\theta}
#     \Big[R(\tau)\sum_t\nabla_\theta\log\pi_\theta(a_t\mid s_t)\Big]$$
#
# using $\nabla P = P\,\nabla\log P$, and that $\log P_\theta(\tau)$ is the sum of the policy's
# token log-probs plus transition terms that do not depend on $\theta$. The right-hand side is an
# expectation, so sampled sequences estimate it without enumerating anything. In code the
# estimator is the gradient of a surrogate, $-\sum_t A_t\log\pi_\theta(a_t\mid s_t)$ with $A_t$
# held constant — `prefjax.losses.reinforce_loss`. We sample 20,000 sequences and compare each
# of the 36 gradient components with the exact gradient.


# %%
def sample(theta, n):
    """n sequences from pi_theta (ancestral sampling)."""
    p = np.asarray(jax.nn.softmax(theta, axis=-1), np.float64)
    seqs = np.zeros((n, T), dtype=np.int64)
    state = np.full(n, START)
    for t in range(T):
        cdf = np.cumsum(p[t, state], axis=-1)
        seqs[:, t] = np.minimum((rng.random(n)[:, None] > cdf).sum(-1), V - 1)
        state = seqs[:, t]
    return seqs


ones = jnp.ones((1, T))


def score_surrogate(theta, seq, advantages):
    """Minus the REINFORCE loss of one sequence: its gradient is the per-sample estimate."""
    logps = L.token_logprobs(logits_of(theta, seq[None]), seq[None])  # [1, T]
    return -L.reinforce_loss(logps, advantages[None], ones).sum()


per_sample_grads = jax.jit(jax.vmap(jax.grad(score_surrogate), in_axes=(None, 0, 0)))

N = 20_000
seqs = sample(theta0, N)
rewards = step_rewards(seqs)  # [N, T]
returns = rewards.sum(-1)  # R(tau)


def estimate(advantages):
    """Mean, standard error and total variance of the per-sample gradients."""
    g = np.asarray(
        per_sample_grads(theta0, jnp.asarray(seqs), jnp.asarray(advantages, jnp.float32))
    )
    g = g.reshape(N, -1)
    return g.mean(0), g.std(0) / np.sqrt(N), g.var(0).sum()


mean_full, se_full, var_full = estimate(np.repeat(returns[:, None], T, axis=1))
exact = np.asarray(exact_grad).ravel()
err = np.abs(mean_full - exact)
assert np.all(err < 4 * se_full + 1e-6), "Monte Carlo estimate disagrees with the exact gradient"
# Logits of states never visited (a previous token at t = 0) get exactly zero gradient.
unused = se_full == 0
np.testing.assert_array_equal(exact[unused], 0.0)
print(
    f"max |MC - exact| / SE = {np.max(err[~unused] / se_full[~unused]):.2f}"
    f" over the {np.sum(~unused)} components that can move"
)

# %% [markdown]
# ## 3. Variance reduction: reward-to-go and a baseline
#
# **Reward-to-go.** The action at step $t$ cannot affect rewards earned before $t$; those terms
# have zero mean ($\mathbb{E}[\nabla\log\pi(a_t\mid s_t)] = \sum_a\nabla\pi(a\mid s_t) =
# \nabla 1 = 0$) but add noise. Weighting $\nabla\log\pi(a_t\mid s_t)$ by
# $G_t = \sum_{t'\ge t}r_{t'}$ (`prefjax.losses.discounted_returns` with $\gamma = 1$) keeps the
# expectation and drops the noise.
#
# **Baseline.** By the same identity any $b(s_t)$ that does not depend on the action may be
# subtracted: $\mathbb{E}[\nabla\log\pi(a_t\mid s_t)\,b(s_t)] = 0$. The natural choice is the
# value $V(s_t)$, which we compute exactly by backward induction; $G_t - V(s_t)$ is the
# advantage. An *action-dependent* "baseline" is not allowed: with $Q(s_t, a_t)$ subtracted the
# estimator's expectation is exactly 0, not the gradient.
#
# All four are estimated from the same 20,000 samples.

# %%
pi0 = np.asarray(jax.nn.softmax(theta0, axis=-1), np.float64)  # [T, V + 1, V]
values = np.zeros((T + 1, V + 1))  # V_t(s), V_T = 0
q_values = np.zeros((T, V + 1, V))  # Q_t(s, a)
for t in reversed(range(T)):
    q_values[t] = reward_table[t] + values[t + 1][None, :V]  # next state is the token a
    values[t] = (pi0[t] * q_values[t]).sum(-1)

reward_to_go = np.asarray(jax.jit(L.discounted_returns)(rewards, np.ones((N, T)), gamma=1.0))
np.testing.assert_allclose(reward_to_go[:, 0], returns, rtol=1e-5)
state_values = values[np.arange(T)[None], states_of(seqs)]  # V_t(s_t)
q_taken = q_values[np.arange(T)[None], states_of(seqs), seqs]  # Q_t(s_t, a_t)

mean_rtg, se_rtg, var_rtg = estimate(reward_to_go)
mean_base, se_base, var_base = estimate(reward_to_go - state_values)
mean_q, se_q, var_q = estimate(reward_to_go - q_taken)

for name, mean, se in [("reward-to-go", mean_rtg, se_rtg), ("baseline", mean_base, se_base)]:
    assert np.all(np.abs(mean - exact) < 4 * se + 1e-6), f"{name} estimator is biased"
assert np.any(np.abs(mean_q - exact) > 10 * se_q), "an action-dependent baseline biases"
np.testing.assert_allclose(mean_q, 0.0, atol=5 * se_q.max())  # ... to exactly zero
assert var_full > var_rtg > var_base  # each step removes variance
print(f"{'estimator':28s} total variance")
for name, var in [("R(tau)", var_full), ("reward-to-go G_t", var_rtg), ("G_t - V(s_t)", var_base)]:
    print(f"{name:28s} {var:10.3f}")
print(f"variance reduced {var_full / var_base:.1f}x by reward-to-go + baseline")

# %%
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.barh(["$R(\\tau)$", "$G_t$", "$G_t - V(s_t)$"], [var_full, var_rtg, var_base], color="C0")
ax.set(xlabel="total variance of the per-sample gradient", title="Same mean, less noise")
ax.invert_yaxis()
plt.show()

# %% [markdown]
# ## 4. The clipped surrogate
#
# A gradient step uses samples from the policy that generated them; to take several steps on one
# batch, PPO weights each token by the importance ratio
# $\rho_t = \pi_\theta(a_t\mid s_t)/\pi_{\text{old}}(a_t\mid s_t)$ (the surrogate
# $\mathbb{E}[\rho_t A_t]$ has the policy gradient as its gradient at $\rho = 1$) and removes the
# incentive to move $\rho_t$ far from 1:
#
# $$L^{\text{CLIP}}_t
#   = \min\big(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\,A_t\big).$$
#
# For $A > 0$ the objective grows with $\rho$ until $1+\epsilon$ and is flat beyond; for $A < 0$
# it is flat below $1-\epsilon$. On the flat parts the gradient is zero — the token has already
# moved as far as this update allows. The `min` makes it a pessimistic bound: a move the
# advantage dislikes is never clipped. `ppo_policy_loss` returns the per-token loss
# $-L^{\text{CLIP}}_t$; below it is compared with these pieces on a grid of ratios, value and
# gradient, and plotted.

# %%
eps = 0.2
ratios = np.linspace(0.305, 1.905, 161)  # a grid that avoids the kinks at 0.8 and 1.2
log_ratio = jnp.asarray(np.log(ratios))[None]  # [1, R]; old log-probs are 0
zeros, mask_r = jnp.zeros_like(log_ratio), jnp.ones_like(log_ratio)


@jax.jit
def surrogate_and_grad(logp, adv):
    def total(logp):
        out = L.ppo_policy_loss(logp, zeros, adv * mask_r, mask_r, clip_eps=eps)
        return out.loss.sum(), out

    return jax.grad(total, has_aux=True)(logp)


fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=False)
for ax, adv in zip(axes, (1.0, -1.0), strict=True):
    grad, out = surrogate_and_grad(log_ratio, adv)
    objective = -np.asarray(out.loss[0])
    want = np.minimum(ratios * adv, np.clip(ratios, 1 - eps, 1 + eps) * adv)
    np.testing.assert_allclose(objective, want, **TOL)
    clipped = ratios > 1 + eps if adv > 0 else ratios < 1 - eps
    np.testing.assert_array_equal(np.asarray(out.clipfrac[0]), clipped.astype(np.float32))
    # d(loss)/d(log pi) = -rho A where the ratio is free, 0 where it is clipped.
    grad = np.asarray(grad[0])
    np.testing.assert_allclose(grad, np.where(clipped, 0.0, -ratios * adv), **TOL)
    ax.plot(ratios, ratios * adv, "k:", label=r"$\rho A$ (unclipped)")
    ax.plot(ratios, objective, "C3", lw=2, label=r"$L^{CLIP}$")
    ax.axvspan(1 - eps, 1 + eps, color="0.9")
    ax.set(xlabel=r"ratio $\rho = \pi_\theta / \pi_{old}$", title=f"A = {adv:+.0f}")
    ax.legend(fontsize=8)
axes[0].set_ylabel("objective (= - loss)")
plt.show()

# %% [markdown]
# At $\rho = 1$ (the first step on a fresh batch) the loss is $-A_t$ with gradient
# $-A_t\nabla\log\pi_\theta$: PPO's first step is the policy gradient of §2. Dual-clip PPO adds
# one more bound for $A < 0$: a token whose ratio has exploded cannot contribute more than
# $-cA$. And `approx_kl` is the $k_3$ estimate $(\rho - 1) - \log\rho$ of
# $\mathrm{KL}(\pi_{\text{old}}\,\|\,\pi_\theta)$ practitioners watch to stop an epoch early.

# %%
adv = jnp.array([[1.5, -0.5, -2.0]])
lp = jnp.array([[-1.0, -2.0, -0.3]])
ones3 = jnp.ones((1, 3))
big = jnp.log(5.0) * ones3  # ratio 5 on every token


@jax.jit
def ppo_checks():
    first = lambda x: L.ppo_policy_loss(x, lp, adv, ones3).loss.sum()  # noqa: E731
    plain = L.ppo_policy_loss(big, 0 * ones3, -ones3, ones3)  # A = -1
    dual = L.ppo_policy_loss(big, 0 * ones3, -ones3, ones3, dual_clip=3.0)
    return L.ppo_policy_loss(lp, lp, adv, ones3).loss, jax.grad(first)(lp), plain, dual


loss_at_1, grad_at_1, plain, dual = ppo_checks()
np.testing.assert_allclose(loss_at_1, -adv, **TOL)  # rho = 1: loss = -A
np.testing.assert_allclose(grad_at_1, -adv, **TOL)  # d(-rho A)/d(log pi) at rho = 1
np.testing.assert_allclose(plain.loss, 5.0 * ones3, **TOL)  # -min(5 * -1, 1.2 * -1)
np.testing.assert_allclose(dual.loss, 3.0 * ones3, **TOL)  # bounded by -c A
np.testing.assert_allclose(plain.approx_kl, (4.0 - np.log(5.0)) * ones3, **TOL)  # (rho-1) - log rho

# %% [markdown]
# ## 5. The value and entropy terms
#
# The critic is regressed on the returns, $\tfrac12(V_\phi(s_t) - R_t)^2$; LLM implementations
# clip it like the policy, $V^{\text{clip}} = V_{\text{old}} + \mathrm{clip}(V - V_{\text{old}},
# -\epsilon, \epsilon)$, and take the larger (pessimistic) of the two squared errors. The entropy
# $H_t = -\sum_v p_v\log p_v$ of the next-token distribution is subtracted with a small weight to
# keep exploring. The full loss is $L = -L^{\text{CLIP}} + c_1 L^{\text{VF}} - c_2 H$.

# %%
v_new = rng.normal(size=(4, 5)).astype(np.float32)
v_old = rng.normal(size=(4, 5)).astype(np.float32)
ret = rng.normal(size=(4, 5)).astype(np.float32)
m = np.ones((4, 5), np.float32)


@jax.jit
def value_loss_and_grad(v):
    out = L.value_loss(v, v_old, ret, m, clip_eps=0.2)
    return out, jax.grad(lambda v: L.value_loss(v, v_old, ret, m, clip_eps=0.2).loss.sum())(v)


vl, gv = value_loss_and_grad(v_new)
v_clip = v_old + np.clip(v_new - v_old, -0.2, 0.2)
np.testing.assert_allclose(
    vl.loss, 0.5 * np.maximum((v_new - ret) ** 2, (v_clip - ret) ** 2), **TOL
)
# Where the clipped error is the larger one, the value gets no gradient.
active = (v_clip - ret) ** 2 > (v_new - ret) ** 2
np.testing.assert_allclose(gv, np.where(active, 0.0, v_new - ret), **TOL)
print(f"value clip active on {active.mean():.0%} of tokens")

logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
logits[1, 2] = 0.0  # a uniform distribution: entropy log 7
p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
ent = jax.jit(L.entropy)(logits)
np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1), **TOL)
np.testing.assert_allclose(ent[1, 2], np.log(7.0), **TOL)
bonus = jax.jit(L.entropy_bonus)(ent, np.ones((2, 3)), entropy_coef=0.01)
np.testing.assert_allclose(bonus, -0.01 * ent, **TOL)

# %% [markdown]
# ## 6. PPO updates on the small problem
#
# Putting it together: sample a batch from $\pi_{\text{old}}$, compute GAE advantages with the
# exact critic ($\gamma = 1$, $\lambda = 0.95$), whiten them, and take 40 full-batch Adam steps on
# the clipped loss plus a small entropy bonus. The same loop with the clip effectively removed
# ($\epsilon$ huge) shows what the clip buys: the unclipped surrogate keeps pushing the ratios
# of the sampled tokens and drifts much further from $\pi_{\text{old}}$, while the clipped one
# stops where the update has no more incentive. Both improve the true objective $J$, which we can
# evaluate exactly.

# %%
batch = sample(theta0, 512)
b_rewards = step_rewards(batch)
b_mask = np.ones_like(b_rewards, dtype=np.float32)
b_values = values[np.arange(T)[None], states_of(batch)]
advantages = jax.jit(
    lambda: L.masked_whiten(L.gae(b_rewards, b_values, b_mask, gamma=1.0, lam=0.95)[0], b_mask)
)()
batch_j = jnp.asarray(batch)
old_logps = jax.jit(L.token_logprobs)(logits_of(theta0, batch_j), batch_j)


@jax.jit
def ppo_epochs(theta, eps_low, eps_high):
    opt = optax.adam(0.05)

    def loss_fn(theta):
        logits = logits_of(theta, batch_j)
        logps = L.token_logprobs(logits, batch_j)
        pol = L.ppo_policy_loss(
            logps, old_logps, advantages, b_mask, epsilon_low=eps_low, epsilon_high=eps_high
        )
        ent = L.entropy_bonus(L.entropy(logits), b_mask, entropy_coef=0.01)
        return L.token_mean(pol.loss + ent, b_mask), pol

    def step(carry, _):
        theta, opt_state = carry
        (_, pol), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta)
        updates, opt_state = opt.update(grads, opt_state)
        stats = (L.masked_mean(pol.approx_kl, b_mask), L.masked_mean(pol.clipfrac, b_mask))
        return (optax.apply_updates(theta, updates), opt_state), stats

    (theta, _), stats = jax.lax.scan(step, (theta, opt.init(theta)), length=40)
    return theta, stats


theta_clip, (kl_clip, clipfrac_clip) = ppo_epochs(theta0, 0.2, 0.2)
theta_free, (kl_free, _) = ppo_epochs(theta0, 0.999, 1e6)
j0, j_clip, j_free = (
    float(expected_return_and_grad(t)[0]) for t in (theta0, theta_clip, theta_free)
)
print(f"J: start {j0:.4f}   clipped PPO {j_clip:.4f}   unclipped {j_free:.4f}")
print(
    f"approx KL(old || new) after 40 steps: clipped {kl_clip[-1]:.4f}, unclipped {kl_free[-1]:.4f}"
)
assert j_clip > j0 and j_free > j0
assert kl_free[-1] > 3 * kl_clip[-1]
assert clipfrac_clip[-1] > 0.0  # the clip engaged

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(kl_clip, label=r"clipped, $\epsilon = 0.2$")
ax.plot(kl_free, label="unclipped")
ax.set(xlabel="Adam step on one batch", ylabel=r"approx KL($\pi_{old} \| \pi_\theta$)")
ax.legend()
plt.show()

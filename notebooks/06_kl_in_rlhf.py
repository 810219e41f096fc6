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
# # 06 · KL in RLHF
#
# **Derived here.** The KL term of the RLHF objective
# $\mathbb{E}_{\pi_\theta}[r] - \beta\,\mathrm{KL}(\pi_\theta\,\|\,\pi_{\text{ref}})$ is never
# computed exactly for a language model — the sum runs over every possible response — but
# estimated from the log-probabilities of the *sampled* tokens. We derive the three standard
# per-sample estimators $k_1, k_2, k_3$ and measure their bias and variance against the exact KL
# of a small distribution; build the per-token KL-shaped rewards that PPO optimises; and show on
# the built-in bandit why the KL term *defines* the objective rather than merely regularising it:
# with $\beta$ too small, a policy trained on a learned (proxy) reward drives the proxy up while
# the true (gold) reward falls — reward hacking.

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

rng = np.random.default_rng(0)
TOL = dict(rtol=1e-5, atol=1e-6)
# The library's functions are pure and unjitted; we jit them once, as a train step does.
kl_estimate = jax.jit(L.kl_estimate, static_argnames="kind")
kl_shaped_rewards = jax.jit(L.kl_shaped_rewards, static_argnames="kind")

# %% [markdown]
# ## 1. Three estimators of $\mathrm{KL}(p\,\|\,q)$ from samples of $p$
#
# With $x\sim p$ (the policy) and the log-ratio $\log\rho(x) = \log p(x) - \log q(x)$
# ($q$ the reference), Schulman's estimators are
#
# | | per sample | expectation under $p$ | |
# |---|---|---|---|
# | $k_1$ | $\log\rho$ | $\sum_x p\log\frac{p}{q} = \mathrm{KL}$ | unbiased; can be < 0; noisy |
# | $k_2$ | $\tfrac12(\log\rho)^2$ | $\mathrm{KL} + O(\mathrm{KL}^{3/2})$ | biased; $\ge 0$; quiet |
# | $k_3$ | $(\rho^{-1} - 1) + \log\rho$ | $\mathrm{KL}$ | unbiased; $\ge 0$; quiet |
#
# $k_3$ adds to $k_1$ the control variate $\rho^{-1} - 1 = q/p - 1$, whose expectation is
# $\sum_x p\,(q/p) - 1 = 0$; and $(1/\rho - 1) + \log\rho \ge 0$ because $\log y \le y - 1$.
# $k_2$ is the second-order term of both: for $q$ close to $p$, $\mathrm{KL}\approx
# \tfrac12\mathbb{E}[(\log\rho)^2]$.
#
# On a distribution over $V = 20$ outcomes we can take these expectations *exactly*, by evaluating
# `kl_estimate` on every outcome and weighting by $p$ — no Monte Carlo error in the check.

# %%
V = 20
logits_p = rng.normal(size=V)
direction = rng.normal(size=V)
scales = np.linspace(0.05, 2.0, 24)  # how far the reference is from the policy


def log_softmax(x):
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


stats = {k: [] for k in ("k1", "k2", "k3")}
true_kl = []
log_p = log_softmax(logits_p)
for scale in scales:
    log_q = log_softmax(logits_p + scale * direction)
    p = np.exp(log_p)
    kl = float(np.sum(p * (log_p - log_q)))
    true_kl.append(kl)
    for kind in stats:
        values = np.asarray(kl_estimate(log_p[None], log_q[None], kind=kind))[0]  # on every x
        mean = p @ values
        stats[kind].append((mean, p @ (values - mean) ** 2))
        if kind in ("k2", "k3"):
            assert np.all(values >= 0)
        else:
            assert np.any(values < 0)  # k1 is negative wherever q(x) > p(x)
true_kl = np.array(true_kl)
stats = {k: np.array(v) for k, v in stats.items()}  # [scale, (mean, variance)]

np.testing.assert_allclose(stats["k1"][:, 0], true_kl, rtol=1e-4)  # unbiased
np.testing.assert_allclose(stats["k3"][:, 0], true_kl, rtol=1e-4)  # unbiased
bias_k2 = stats["k2"][:, 0] - true_kl
assert np.all(np.abs(bias_k2[:3] / true_kl[:3]) < 0.05)  # small when q is close to p
assert np.abs(bias_k2[-1] / true_kl[-1]) > 0.1  # but grows with the KL
assert np.all(stats["k3"][:8, 1] < stats["k1"][:8, 1])  # k3 beats k1 on variance near p
print(" KL     bias k2   std k1   std k2   std k3")
for i in (0, 8, 16, 23):
    print(f"{true_kl[i]:.3f}  {bias_k2[i]:+.4f}   {np.sqrt(stats['k1'][i, 1]):.3f}    "
          f"{np.sqrt(stats['k2'][i, 1]):.3f}    {np.sqrt(stats['k3'][i, 1]):.3f}")  # fmt: skip

# %% [markdown]
# A Monte Carlo estimate from 200 samples agrees with the exact expectation within its standard
# error (here at the largest KL), and the picture below summarises the trade-off: $k_3$ is the
# usual choice for a KL *penalty in the loss* (GRPO's `grpo_loss` uses it), $k_1$ the one whose
# per-token values define the shaped *reward* (next section), since it sums to the sequence
# log-ratio.

# %%
samples = rng.choice(V, size=200, p=np.exp(log_p))
lp_s, lq_s = log_p[samples][None], log_q[samples][None]  # log_q is the farthest reference
for kind in ("k1", "k3"):
    est = np.asarray(kl_estimate(lp_s, lq_s, kind=kind))[0]
    assert abs(est.mean() - true_kl[-1]) < 4 * est.std() / np.sqrt(len(est))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
for kind, style in (("k1", "C0"), ("k2", "C1"), ("k3", "C2")):
    axes[0].plot(true_kl, stats[kind][:, 0] - true_kl, style, label=kind)
    axes[1].plot(true_kl, np.sqrt(stats[kind][:, 1]), style, label=kind)
axes[0].set(xlabel="true KL", ylabel="bias (exact)", title="Bias")
axes[1].set(xlabel="true KL", ylabel="standard deviation per sample", title="Noise")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Per-token KL-shaped rewards
#
# The sequence-level KL penalty decomposes over tokens: $\log\frac{\pi_\theta(y\mid x)}
# {\pi_{\text{ref}}(y\mid x)} = \sum_t\log\frac{\pi_\theta(y_t\mid s_t)}{\pi_{\text{ref}}(y_t\mid
# s_t)}$. InstructGPT-style PPO therefore gives every token the reward
# $-\beta\,k_1(t)$ and adds the reward model's score $s$ on the last real token:
#
# $$r_t = -\beta\log\frac{\pi_\theta(y_t)}{\pi_{\text{ref}}(y_t)} + [t = T]\,s, \qquad
#   \sum_t r_t = s - \beta\log\frac{\pi_\theta(y)}{\pi_{\text{ref}}(y)},$$
#
# an unbiased estimate of the KL-regularised objective for the sampled response. GAE (notebook
# 05) then spreads it over the tokens. The lesson's two one-token examples with $\beta = 0.2$:
# a near-reference response (score 1.20, log-probs $-2.1$ vs $-2.2$) keeps $1.18$, while a
# higher-scoring but drifting one (1.35, $-1.2$ vs $-2.8$) drops to $1.03$ — the higher raw score
# is no longer the better target.

# %%
out = kl_shaped_rewards(
    jnp.array([1.20, 1.35]), jnp.array([[-2.1], [-1.2]]), jnp.array([[-2.2], [-2.8]]),
    jnp.ones((2, 1)), kl_coef=0.2,
)  # fmt: skip
np.testing.assert_allclose(out.rewards[:, 0], [1.18, 1.03], atol=1e-5)

# Right-padded responses of different lengths: the score sits on the last real token, padding
# gets nothing, and the rewards sum to score - beta * (sequence log-ratio).
B, T, beta = 6, 9, 0.1
lengths = rng.integers(1, T + 1, size=B)
mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
logps = rng.normal(-2.0, 0.5, size=(B, T)).astype(np.float32)
ref_logps = logps + rng.normal(0.0, 0.3, size=(B, T)).astype(np.float32)
scores = rng.normal(size=B).astype(np.float32)
shaped = kl_shaped_rewards(scores, logps, ref_logps, mask, kl_coef=beta)
seq_log_ratio = ((logps - ref_logps) * mask).sum(-1)
np.testing.assert_allclose(shaped.rewards.sum(-1), scores - beta * seq_log_ratio, **TOL)
last = (np.arange(B), lengths - 1)
np.testing.assert_allclose(shaped.rewards[last], scores - beta * (logps - ref_logps)[last], **TOL)
np.testing.assert_array_equal(np.asarray(shaped.rewards)[mask == 0], 0.0)
# With gamma = lambda = 1 and no critic, the first token's advantage is the whole shaped return.
adv, _ = jax.jit(L.gae)(shaped.rewards, np.zeros((B, T)), mask, gamma=1.0, lam=1.0)
np.testing.assert_allclose(adv[:, 0], scores - beta * seq_log_ratio, **TOL)

# %% [markdown]
# ## 3. Why the KL term defines the objective: reward hacking
#
# The reward model is a proxy fitted on finitely many comparisons, mostly of responses the
# reference policy likes to produce. Where the data are thin, it can be confidently wrong — and a
# policy optimised against it *will* find those places. Here, on a 10-arm bandit:
#
# 1. fit a proxy reward $\hat r$ by Bradley–Terry maximum likelihood on 100 preference pairs drawn
#    from $\pi_{\text{ref}}$ (`bradley_terry_loss`, a small L2 penalty);
# 2. run RLHF on it: sample 512 arms from $\pi_\theta$ per step, shape the rewards with
#    `kl_shaped_rewards` (proxy score minus $\beta k_1$), subtract the batch mean as a baseline,
#    and take an Adam step on `reinforce_loss`;
# 3. track the exact expected proxy and gold rewards of $\pi_\theta$ during training, for a
#    $\beta$ that is too small (0.01) and a sensible one (1.0).

# %%
bandit = Bandit.make(num_arms=10, seed=9, ref_scale=1.5)
gold = bandit.rewards[0]
ref = jnp.asarray(bandit.ref_logprobs[0], jnp.float32)
records = bandit.pairwise_records(100, seed=9)
arm = {a: i for i, a in enumerate(bandit.arms)}
win = np.array([arm[x["chosen"]] for x in records])
lose = np.array([arm[x["rejected"]] for x in records])


@jax.jit
def fit_proxy():
    loss = lambda t: L.bradley_terry_loss(t[win], t[lose]).mean() + 1e-3 * jnp.sum(t**2)  # noqa: E731
    opt = optax.adam(0.1)

    def step(carry, _):
        t, state = carry
        updates, state = opt.update(jax.grad(loss)(t), state)
        return (optax.apply_updates(t, updates), state), None

    t = jnp.zeros(len(gold))
    return jax.lax.scan(step, (t, opt.init(t)), length=1000)[0][0]


proxy = fit_proxy()
counts = np.bincount(np.concatenate([win, lose]), minlength=len(gold))
hacked = int(np.argmax(proxy))
print("arm        :", " ".join(f"{a:>5}" for a in bandit.arms))
print("pi_ref     :", " ".join(f"{p:5.2f}" for p in np.exp(ref)))
print("compared   :", " ".join(f"{c:5d}" for c in counts))
print("gold r     :", " ".join(f"{g:+5.2f}" for g in gold))
print("proxy r    :", " ".join(f"{g:+5.2f}" for g in np.asarray(proxy - proxy.mean())))
assert hacked != int(np.argmax(gold)) and gold[hacked] < np.exp(ref) @ gold

# %%
STEPS, N = 300, 512
ones = jnp.ones((N, 1))


@jax.jit
@jax.vmap
def rlhf(beta, key):
    opt = optax.adam(0.05)

    def loss_fn(theta, key):
        logp_all = jax.nn.log_softmax(theta)
        y = jax.random.categorical(key, theta, shape=(N,))  # sampled "responses"
        logp = logp_all[y][:, None]  # [N, 1] one-token responses
        shaped = L.kl_shaped_rewards(
            proxy[y], jax.lax.stop_gradient(logp), ref[y][:, None], ones, kl_coef=beta
        ).rewards  # [N, 1]
        advantages = shaped - shaped.mean()  # batch-mean baseline
        return L.reinforce_loss(logp, advantages, ones).mean()

    def step(carry, key):
        theta, state = carry
        updates, state = opt.update(jax.grad(loss_fn)(theta, key), state)
        theta = optax.apply_updates(theta, updates)
        pi = jax.nn.softmax(theta)
        kl = jnp.sum(pi * (jnp.log(pi) - ref))
        return (theta, state), (pi @ proxy, pi @ gold, kl)

    theta = ref
    keys = jax.random.split(key, STEPS)
    return jax.lax.scan(step, (theta, opt.init(theta)), keys)[1]


betas = jnp.array([0.01, 1.0])
proxy_curve, gold_curve, kl_curve = map(
    np.asarray, rlhf(betas, jax.random.split(jax.random.key(0), 2))
)  # each [beta, step]
gold_ref = float(np.exp(ref) @ gold)
for i, b in enumerate(np.asarray(betas)):
    print(
        f"beta = {b:4.2f}: proxy {proxy_curve[i, 0]:+.3f} -> {proxy_curve[i, -1]:+.3f}, "
        f"gold {gold_curve[i, 0]:+.3f} -> {gold_curve[i, -1]:+.3f} "
        f"(peak {gold_curve[i].max():+.3f}), KL {kl_curve[i, -1]:.2f}"
    )

small, good = 0, 1
# beta too small: the proxy keeps rising while the gold reward falls below where it started.
assert proxy_curve[small, -1] > proxy_curve[small, 0] + 0.5
assert gold_curve[small, -1] < gold_ref - 0.3
assert gold_curve[small, -1] < gold_curve[small].max() - 0.3
# A sensible beta stays close to the reference and ends with a higher gold reward.
assert gold_curve[good, -1] > gold_ref and gold_curve[good, -1] > gold_curve[small, -1] + 0.5
assert kl_curve[good, -1] < kl_curve[small, -1] / 2
# And it lands on the closed-form optimum of the (proxy) KL-regularised objective.
pi_star_proxy = np.exp(log_softmax(np.asarray(ref, np.float64) + np.asarray(proxy) / 1.0))
np.testing.assert_allclose(gold_curve[good, -1], pi_star_proxy @ gold, atol=0.1)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for ax, i in zip(axes, (small, good), strict=True):
    ax.plot(proxy_curve[i] - proxy_curve[i, 0], label="proxy reward (what is optimised)")
    ax.plot(gold_curve[i] - gold_curve[i, 0], label="gold reward (what we wanted)")
    ax.axhline(0, color="0.8", lw=1)
    ax.set(xlabel="RLHF step", title=f"beta = {float(betas[i]):g}: final KL {kl_curve[i, -1]:.2f}")
axes[0].set_ylabel("change since the reference policy")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# With $\beta = 0.01$ the policy walks onto the arm the proxy over-rates — one the reference
# rarely produced, so the reward model saw it in few comparisons — and the gold reward ends
# below the reference policy's. With $\beta = 1$ the KL term keeps $\pi_\theta$ where the proxy
# was trained and can be trusted: the objective is $\mathbb{E}[\hat r] - \beta\,\mathrm{KL}$,
# whose optimum (notebook 02) is $\pi_{\text{ref}}\,e^{\hat r/\beta}/Z$, not "maximise $\hat r$".
# That closed form is also what DPO (notebook 03) fits directly, which is why DPO inherits the
# same $\beta$.

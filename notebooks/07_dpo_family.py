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
# # 07 · The DPO family
#
# **Derived here.** DPO (notebook 03) is maximum likelihood under Bradley–Terry with the
# policy's implicit reward. Its variants change one assumption at a time, and each change is
# visible in a few lines of algebra and a small experiment:
#
# * **IPO** — a bounded regression target instead of a likelihood: why DPO over-fits
#   near-deterministic preferences, shown on the bandit;
# * **robust DPO / cDPO** — labels flipped with a known rate: which loss recovers the true reward;
# * **KTO** — unpaired thumbs-up/down feedback instead of pairs;
# * **ORPO** and **SimPO** — no reference model; the length bias of summed log-probabilities and
#   SimPO's length normalisation, demonstrated;
# * **GRPO** — not a DPO variant but its online cousin: group-relative advantages instead of a
#   critic.
#
# Every loss is `prefjax.losses`'; the notebook ends with a table of the data each one needs.

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


def log_sigmoid(x):  # float64 reference
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def train_tabular(loss_fn, theta0, steps, lr=0.05):
    """Adam on a [K] table of logits; returns the logits after every step ([steps, K])."""
    opt = optax.adam(lr)

    def step(carry, _):
        theta, state = carry
        updates, state = opt.update(jax.grad(loss_fn)(theta), state)
        theta = optax.apply_updates(theta, updates)
        return (theta, state), theta

    return jax.lax.scan(step, (theta0, opt.init(theta0)), length=steps)[1]


# %% [markdown]
# ## 1. IPO: a bounded target
#
# With $h = \log\frac{\pi_\theta(y_w)}{\pi_{\text{ref}}(y_w)} - \log\frac{\pi_\theta(y_l)}
# {\pi_{\text{ref}}(y_l)}$, DPO minimises $-\log\sigma(\beta h)$. If a pair is labelled the same
# way every time — near-deterministic preferences, common when one response is clearly better —
# the Bradley–Terry MLE of the reward gap is infinite, and so is DPO's optimum: the loss decreases
# for every increase of $h$, its gradient $\beta\sigma(-\beta h)$ never vanishes, and
# $\pi_\theta(y_l)\to 0$ whatever $\beta$ says. The KL regularisation that $\beta$ was meant to
# provide disappears from the optimum. IPO (Azar et al., 2023) regresses the margin onto a
# finite target instead,
#
# $$\ell_{\text{IPO}} = \Big(h - \frac{1}{2\beta}\Big)^2,$$
#
# so with deterministic labels $h^* = 1/(2\beta)$, and $\beta$ keeps its meaning. On a two-arm
# bandit whose labels are deterministic (`temperature=0`: the higher reward always wins), we
# train both losses from $\pi_{\text{ref}}$.

# %%
beta = 0.5
np.testing.assert_allclose(
    L.ipo_loss(jnp.array([0.3]), jnp.array([-0.2]), jnp.zeros(1), jnp.zeros(1), beta=beta).loss,
    [(0.5 - 1 / (2 * beta)) ** 2],
    **TOL,
)
det = Bandit.make(num_arms=2, seed=4, temperature=0.0)
pairs = det.pairwise_records(256, seed=0)
best = int(np.argmax(det.rewards[0]))
assert all(x["chosen"] == det.arms[best] for x in pairs)  # every label is the same
w, lo = jnp.array([best]), jnp.array([1 - best])
ref2 = jnp.asarray(det.ref_logprobs[0], jnp.float32)


def pair_loss(loss):
    def f(theta):
        lp = jax.nn.log_softmax(theta)
        return loss(lp[w], lp[lo], ref2[w], ref2[lo], beta=beta).loss.mean()

    return f


traj = {name: jax.jit(train_tabular, static_argnums=(0, 2))(pair_loss(fn), ref2, 4000)
        for name, fn in (("DPO", L.dpo_loss), ("IPO", L.ipo_loss))}  # fmt: skip
margin = {k: np.asarray(((jax.nn.log_softmax(t) - ref2) @ jnp.array([1.0, -1.0]))
                        * (1 if best == 0 else -1)) for k, t in traj.items()}  # fmt: skip
pi_star = det.optimal_policy(beta)[0]
h_star = float(
    (np.log(pi_star) - det.ref_logprobs[0]) @ np.array([1, -1]) * (1 if best == 0 else -1)
)
print(
    f"margin h after 1000 / 4000 steps:  DPO {margin['DPO'][999]:.2f} / {margin['DPO'][-1]:.2f}",
    f"  IPO {margin['IPO'][999]:.3f} / {margin['IPO'][-1]:.3f}   (1/(2 beta) = {1 / (2 * beta)})",
)
np.testing.assert_allclose(margin["IPO"][-1], 1 / (2 * beta), atol=1e-3)  # IPO: finite optimum
assert margin["DPO"][-1] > margin["DPO"][999] + 1.0  # DPO: still climbing
pi_dpo = np.asarray(jax.nn.softmax(traj["DPO"][-1]))
assert pi_dpo[1 - best] < 1e-3 < pi_star[1 - best]  # the rejected arm is driven to 0 ...
pi_ipo = np.asarray(jax.nn.softmax(traj["IPO"][-1]))
print(
    f"pi(rejected arm): DPO {pi_dpo[1 - best]:.1e}, IPO {pi_ipo[1 - best]:.3f},",
    f"pi* for the true reward {pi_star[1 - best]:.3f}",
)

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(margin["DPO"], label="DPO")
ax.plot(margin["IPO"], label="IPO")
ax.axhline(1 / (2 * beta), color="C1", ls=":", label=r"$1/(2\beta)$")
ax.axhline(h_star, color="k", ls=":", lw=1, label=r"$h$ of $\pi^*$ (true reward)")
ax.set(xlabel="Adam step", ylabel="log-ratio margin $h$", title="Deterministic preferences")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# (… whereas the true reward gap is finite, so $\pi^*$ keeps some mass on it: with deterministic
# labels the data simply do not contain the information DPO's likelihood needs.)
#
# ## 2. Label noise: cDPO and robust DPO
#
# Suppose each label is flipped with known probability $\varepsilon$. A pair whose true
# preference probability is $p = \sigma(\Delta r)$ is then observed the right way round with
# probability $q = (1-\varepsilon)p + \varepsilon(1-p)$. Minimising the *expected* loss over a
# single pair's margin gives, with $u = \beta h$ (set the derivative to zero):
#
# * **DPO** $\;\ell = -\log\sigma(u)$: $\sigma(u^*) = q$ — the implicit reward gap fits the
#   *noisy* labels, shrunk toward 0;
# * **cDPO** (label smoothing $\varepsilon$), $\ell = -(1-\varepsilon)\log\sigma(u) -
#   \varepsilon\log\sigma(-u)$: $\sigma(u^*) = (1-\varepsilon)q + \varepsilon(1-q)$ — shrunk
#   further; conservative by design (it also keeps $u^*$ finite when $p = 1$);
# * **robust DPO** (Chowdhury et al., 2024), $\ell = \frac{(1-\varepsilon)(-\log\sigma(u)) -
#   \varepsilon(-\log\sigma(-u))}{1 - 2\varepsilon}$: its expectation under noisy labels is the
#   clean-label DPO loss, so $\sigma(u^*) = p$ — the true reward gap.
#
# We find each minimiser numerically (gradient descent on the expected loss, the loss evaluated
# by `dpo_loss` / `robust_dpo_loss`) for a range of true gaps at $\varepsilon = 0.2$ and compare
# with these closed forms.

# %%
eps = 0.2
true_gap = np.linspace(0.1, 3.0, 12)  # Delta r = r_w - r_l
p = 1 / (1 + np.exp(-true_gap))
q = (1 - eps) * p + eps * (1 - p)
z1 = jnp.zeros(1)


def expected_loss(u, q, loss, smoothing):
    """E over the noisy label of the loss at implicit-reward gap u (beta = 1, h = u)."""
    right = loss(u[None], z1, z1, z1, beta=1.0, label_smoothing=smoothing).loss[0]
    wrong = loss(z1, u[None], z1, z1, beta=1.0, label_smoothing=smoothing).loss[0]
    return q * right + (1 - q) * wrong


@jax.jit
def minimiser(q):
    out = {}
    for name, loss, smoothing in (("DPO", L.dpo_loss, 0.0), ("cDPO", L.dpo_loss, eps),
                                  ("robust", L.robust_dpo_loss, eps)):  # fmt: skip
        opt = optax.adam(0.05)

        def step(carry, _, loss=loss, smoothing=smoothing, opt=opt):
            u, state = carry
            updates, state = opt.update(jax.grad(expected_loss)(u, q, loss, smoothing), state)
            return (optax.apply_updates(u, updates), state), None

        u0 = jnp.zeros(())
        out[name] = jax.lax.scan(step, (u0, opt.init(u0)), length=1500)[0][0]
    return out


u_star = {k: np.asarray(v) for k, v in jax.vmap(minimiser)(jnp.asarray(q, jnp.float32)).items()}
logit = lambda x: np.log(x / (1 - x))  # noqa: E731
np.testing.assert_allclose(u_star["DPO"], logit(q), atol=2e-3)
np.testing.assert_allclose(u_star["cDPO"], logit((1 - eps) * q + eps * (1 - q)), atol=2e-3)
np.testing.assert_allclose(u_star["robust"], true_gap, atol=2e-3)  # recovers the true reward gap
assert np.all(u_star["cDPO"] < u_star["DPO"]) and np.all(u_star["DPO"] < true_gap)

fig, ax = plt.subplots(figsize=(4.5, 3.6))
for k in ("robust", "DPO", "cDPO"):
    ax.plot(true_gap, u_star[k], "o-", ms=3, label=k)
ax.plot(true_gap, true_gap, "k:", lw=1)
ax.set(xlabel=r"true reward gap $\Delta r$", ylabel=r"learned implicit gap $\beta h^*$",
       title=rf"Labels flipped with $\varepsilon$ = {eps}")  # fmt: skip
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 3. KTO: unpaired feedback
#
# Much feedback is a thumbs up or down on a single response, with no partner to compare. KTO
# (Ethayarajh et al., 2024) scores each response by its implicit reward
# $r_\theta = \log\frac{\pi_\theta(y)}{\pi_{\text{ref}}(y)}$ relative to a reference point
# $z_0$, an estimate of $\mathrm{KL}(\pi_\theta\,\|\,\pi_{\text{ref}})$ that carries no
# gradient, and pushes desirable responses above it and undesirable ones below:
#
# $$\ell = \begin{cases}\lambda_D\big(1 - \sigma(\beta(r_\theta - z_0))\big) & \text{desirable}\\
#   \lambda_U\big(1 - \sigma(\beta(z_0 - r_\theta))\big) & \text{undesirable.}\end{cases}$$
#
# Checked against the formula (and that $z_0$ gets no gradient), then trained on the bandit's
# unpaired data (`Bandit.unpaired_records`: one arm sampled from $\pi_{\text{ref}}$, labelled
# desirable with probability $\sigma(r - \bar r)$): the expected gold reward rises.

# %%
lp, rp = rng.normal(-3, 1, size=8).astype(np.float32), rng.normal(-3, 1, size=8).astype(np.float32)
desirable = np.array([1, 0] * 4)
out = jax.jit(L.kto_loss)(
    lp, rp, desirable, 0.3, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5
)
sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
want = np.where(
    desirable == 1, 1 - sig(0.5 * (lp - rp - 0.3)), 1.5 * (1 - sig(0.5 * (0.3 - (lp - rp))))
)
np.testing.assert_allclose(out.loss, want, **TOL)
g_z0 = jax.grad(lambda z: L.kto_loss(lp, rp, desirable, z, beta=0.5).loss.sum())(0.3)
assert float(g_z0) == 0.0  # the reference point is a constant of the update

bandit = Bandit.make(num_arms=6, seed=1, ref_scale=0.7)
feedback = bandit.unpaired_records(2000, seed=0)
arm = {a: i for i, a in enumerate(bandit.arms)}
y = jnp.array([arm[x["completion"]] for x in feedback])
label = jnp.array([x["label"] for x in feedback])
ref6 = jnp.asarray(bandit.ref_logprobs[0], jnp.float32)


def kto_objective(theta):
    logp = jax.nn.log_softmax(theta)
    pi = jnp.exp(logp)
    z0 = jnp.sum(pi * (logp - ref6))  # exact KL on the bandit (stop-gradient inside kto_loss)
    return L.kto_loss(logp[y], ref6[y], label, z0, beta=0.5).loss.mean()


kto_traj = jax.jit(train_tabular, static_argnums=(0, 2))(kto_objective, ref6, 500)
pi_kto = np.asarray(jax.nn.softmax(kto_traj[-1]))
gold_ref = float(np.exp(bandit.ref_logprobs[0]) @ bandit.rewards[0])
gold_kto = float(pi_kto @ bandit.rewards[0])
print(f"{np.mean(label):.0%} of 2,000 responses marked desirable; expected gold reward "
      f"{gold_ref:.3f} (reference) -> {gold_kto:.3f} (KTO)")  # fmt: skip
assert gold_kto > gold_ref + 0.2

# %% [markdown]
# ## 4. Reference-free: ORPO and SimPO, and the length bias of summed log-probs
#
# **ORPO** (Hong et al., 2024) adds to the SFT loss on the chosen response a penalty on the odds
# ratio of chosen to rejected, with $p$ the length-averaged probability
# $\exp\big(\frac{1}{|y|}\log\pi(y)\big)$ and no reference model:
# $\ell_{OR} = -\beta\log\sigma\big(\log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)}\big)$,
# $\mathrm{odds} = p/(1-p)$.

# %%
avg_w = np.log(rng.uniform(0.05, 0.9, size=8)).astype(np.float32)
avg_l = np.log(rng.uniform(0.05, 0.9, size=8)).astype(np.float32)
odds = lambda a: np.exp(a) / (1 - np.exp(a))  # noqa: E731
log_odds_ratio = np.log(odds(avg_w) / odds(avg_l))
np.testing.assert_allclose(
    L.orpo_log_odds_ratio(avg_w, avg_l), log_odds_ratio, rtol=1e-4, atol=1e-5
)
np.testing.assert_allclose(
    L.orpo_loss(avg_w, avg_l, beta=0.1).loss, -0.1 * log_sigmoid(log_odds_ratio), rtol=1e-4
)

# %% [markdown]
# **Why length-average?** A sequence's log-probability is a *sum* over its tokens, so longer
# responses have lower log-probabilities even when every token is equally likely. Sample 400
# responses of 2–30 tokens from one fixed next-token distribution: the summed log-prob
# (`sequence_logprobs`) falls in proportion to length, the average (`average=True`) does not
# depend on it. A reference-free reward built from summed log-probs would prefer the shorter
# response in most pairs for no reason other than length.

# %%
V, T = 50, 30
logits = np.tile(rng.normal(size=V).astype(np.float32), (400, T, 1))  # same distribution everywhere
probs = np.exp(logits[0, 0]) / np.exp(logits[0, 0]).sum()
tokens = rng.choice(V, size=(400, T), p=probs)
lengths = rng.integers(2, T + 1, size=400)
mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
seq_logps = jax.jit(L.sequence_logprobs, static_argnames="average")
summed = np.asarray(seq_logps(logits, tokens, mask, average=False))
averaged = np.asarray(seq_logps(logits, tokens, mask, average=True))
corr_sum, corr_avg = np.corrcoef(lengths, summed)[0, 1], np.corrcoef(lengths, averaged)[0, 1]
print(f"correlation with length: summed {corr_sum:+.2f}, averaged {corr_avg:+.2f}")
assert corr_sum < -0.9 and abs(corr_avg) < 0.2
i, j = rng.integers(0, 400, size=(2, 2000))
longer_first = lengths[i] != lengths[j]
prefers_shorter = np.mean((summed[i] > summed[j]) == (lengths[i] < lengths[j]), where=longer_first)
print(f"summed log-prob prefers the shorter response in {prefers_shorter:.0%} of pairs")
assert prefers_shorter > 0.9

# %% [markdown]
# DPO's implicit reward is a sum too: a per-token log-ratio drift $\delta$ contributes
# $\beta\delta|y|$, so lengthening a response that the policy already up-weights raises its
# implicit reward — one route to the verbosity drift practitioners watch for. **SimPO** (Meng et
# al., 2024) uses the length-normalised log-prob as the reward, drops the reference, and asks for
# a target margin $\gamma$:
# $\ell = -\log\sigma\big(\frac{\beta}{|y_w|}\log\pi(y_w) - \frac{\beta}{|y_l|}\log\pi(y_l) -
# \gamma\big)$. Repeating a response twice doubles its summed log-prob but leaves SimPO's reward
# unchanged.

# %%
delta = 0.05
dpo_out = L.dpo_loss(
    delta * np.array([10.0, 40.0]), np.zeros(2), np.zeros(2), np.zeros(2), beta=0.1
)
np.testing.assert_allclose(dpo_out.chosen_rewards, [0.1 * 0.05 * 10, 0.1 * 0.05 * 40], **TOL)

np.testing.assert_allclose(
    L.simpo_loss(avg_w, avg_l, beta=2.0, gamma=1.0).loss,
    -log_sigmoid(2.0 * (avg_w - avg_l) - 1.0),
    rtol=1e-5,
)
twice = np.concatenate([tokens[:5, :10], tokens[:5, :10]], axis=1)  # [5, 20]: each repeated
once_mask, twice_mask = np.ones((5, 10), np.float32), np.ones((5, 20), np.float32)
lg = logits[:5, :20]
once = tokens[:5, :10]
sum_twice = seq_logps(lg, twice, twice_mask, average=False)
sum_once = seq_logps(lg[:, :10], once, once_mask, average=False)
np.testing.assert_allclose(sum_twice, 2 * sum_once, rtol=1e-5)  # summed: doubles
avg_twice = seq_logps(lg, twice, twice_mask, average=True)
avg_once = seq_logps(lg[:, :10], once, once_mask, average=True)
np.testing.assert_allclose(avg_twice, avg_once, rtol=1e-5)  # averaged: unchanged

# %% [markdown]
# ## 5. GRPO: group-relative advantages
#
# GRPO (Shao et al., 2024) is online: sample $G$ responses per prompt, score them, and use each
# response's reward relative to its group as the advantage of all its tokens — no critic:
# $\hat A_i = (r_i - \mathrm{mean}(r))/\mathrm{std}(r)$. The lesson's example, rewards
# $[1, 0, 0.5, 1]$, gives $[0.905, -1.508, -0.302, 0.905]$ with the *population* std;
# `group_advantages` follows TRL and verl and divides by the *sample* std (ddof = 1), which
# scales every advantage by $\sqrt{(G-1)/G}$ — same direction, different size. RLOO instead
# baselines each response by the mean of the other $G-1$. The policy loss is the PPO surrogate
# plus a $k_3$ KL to the reference (`grpo_loss`); at ratio 1 with policy = reference it is
# $-\hat A$ on every token.

# %%
rewards = jnp.array([1.0, 0.0, 0.5, 1.0, 0.2, 0.9, 0.4, 0.4])  # two prompts, G = 4
adv = np.asarray(L.group_advantages(rewards, group_size=4))
lesson = np.array([0.905, -1.508, -0.302, 0.905])
np.testing.assert_allclose(adv[:4] * np.sqrt(4 / 3), lesson, atol=2e-3)  # eps = 1e-4 aside
for g in (adv[:4], adv[4:]):
    np.testing.assert_allclose(g.sum(), 0.0, atol=1e-5)
r2 = np.asarray(rewards).reshape(2, 4)
np.testing.assert_allclose(
    L.rloo_advantages(rewards, group_size=4),
    (r2 - (r2.sum(1, keepdims=True) - r2) / 3).ravel(),
    **TOL,
)

lp_tok = jnp.asarray(rng.normal(-1, 0.3, size=(8, 5)), jnp.float32)
ref_tok = lp_tok + 0.1
gm = jnp.ones((8, 5))
out = L.grpo_loss(lp_tok, lp_tok, lp_tok, adv, gm, beta=0.04)
np.testing.assert_allclose(out.loss, -np.broadcast_to(adv[:, None], (8, 5)), **TOL)
out = L.grpo_loss(lp_tok, lp_tok, ref_tok, adv, gm, beta=0.04)
np.testing.assert_allclose(out.kl, np.exp(0.1) - 0.1 - 1, rtol=1e-4)  # k3 with log-ratio -0.1
np.testing.assert_allclose(out.loss, -adv[:, None] + 0.04 * out.kl, **TOL)
print("GRPO advantages (ddof=1):", np.round(adv[:4], 3), " lesson (population std):", lesson)

# %% [markdown]
# ## 6. What data each objective needs
#
# | objective | data per example | reference model |
# |---|---|---|
# | Bradley–Terry RM (`bradley_terry_loss`) | prompt, chosen, rejected (+ margin) | – |
# | Plackett–Luce RM (`plackett_luce_loss`) | prompt, $K$ responses ranked best-first | – |
# | DPO, robust, cDPO, hinge, … (`PAIRWISE_LOSSES`) | prompt, chosen, rejected | frozen |
# | IPO (`ipo_loss`, length-averaged log-probs) | prompt, chosen, rejected | frozen |
# | listwise DPO (`listwise_dpo_loss`) | prompt, $K$ ranked responses | frozen |
# | KTO (`kto_loss`, `kto_reference_point`) | prompt, one response, desirable yes/no | frozen |
# | ORPO (`orpo_loss` + `sft_loss`) | prompt, chosen, rejected | none |
# | SimPO (`simpo_loss`, length-averaged) | prompt, chosen, rejected | none |
# | PPO (`ppo_policy_loss`, `value_loss`, `gae`) | prompts, reward model, samples | frozen, critic |
# | GRPO / RLOO (`grpo_loss`, `group_advantages`) | prompts, reward fn, $G$ samples each | frozen |
#
# ("frozen": a frozen copy of the reference policy, or its log-probs precomputed once.)
#
# The pairwise variants share one signature, so a config picks any of them by name:

# %%
print(sorted(L.PAIRWISE_LOSSES))
for name, fn in L.PAIRWISE_LOSSES.items():
    z = jnp.zeros(3)
    assert fn(z, z, z, z, beta=0.1).loss.shape == (3,), name
assert L.PAIRWISE_LOSSES["sigmoid"] is L.dpo_loss and L.PAIRWISE_LOSSES["ipo"] is L.ipo_loss

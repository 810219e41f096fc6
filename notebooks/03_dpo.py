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
# # 03 · DPO from the optimum
#
# **Derived here.** Notebook 02 showed that the KL-regularised objective is maximised by
# $\pi^*(y\mid x) = \pi_{\text{ref}}(y\mid x)\,e^{r(x,y)/\beta}/Z(x)$. Direct Preference
# Optimization (Rafailov et al., 2023) reads this equation backwards: it writes the reward in
# terms of the optimal policy, substitutes it into the Bradley–Terry likelihood of the
# preference data, and notices that the intractable $Z(x)$ cancels. What is left is a
# classification loss on the policy itself,
#
# $$\mathcal{L}_{\text{DPO}} = -\log\sigma\Big(
#   \beta\log\frac{\pi_\theta(y_w\mid x)}{\pi_{\text{ref}}(y_w\mid x)}
#   - \beta\log\frac{\pi_\theta(y_l\mid x)}{\pi_{\text{ref}}(y_l\mid x)}\Big).$$
#
# Each step is checked with `prefjax.losses` on the built-in bandit, whose true reward and
# optimum are known: the inversion, the cancellation, the loss and its gradient (the
# $\sigma(-\text{margin})$ weighting), the worked numbers, a DPO run that converges to $\pi^*$,
# and the Plackett–Luce form for rankings of $K > 2$ responses.

# %% [markdown]
# ## Setup

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import prefjax.losses as L
from experiments.configs import dpo as dpo_configs
from prefjax import sharding
from prefjax.data.batching import BatchIterator
from prefjax.data.tasks import Bandit
from prefjax.models import ByteTokenizer
from prefjax.train import common, evaluation
from prefjax.train import dpo as dpo_train
from prefjax.train import setup as train_setup

bandit = Bandit.make(num_arms=6, num_prompts=1, seed=1, ref_scale=0.7)
beta = 0.5
r = bandit.rewards[0]  # [K] true rewards
ref = bandit.ref_logprobs[0]  # [K] log pi_ref
pi_star = bandit.optimal_policy(beta)[0]  # [K]
K = len(r)
TOL = dict(rtol=1e-5, atol=1e-5)
# The losses are pure and unjitted; we jit them once, as a train step does.
dpo_loss = jax.jit(L.dpo_loss)
print("r      =", np.round(r, 3))
print("pi_ref =", np.round(np.exp(ref), 3))
print("pi*    =", np.round(pi_star, 3), f"(beta = {beta})")

# %% [markdown]
# ## 1. The reward in terms of the optimal policy
#
# Take logarithms of $\pi^* = \pi_{\text{ref}}\,e^{r/\beta}/Z$ and solve for $r$:
#
# $$r(x,y) = \beta\log\frac{\pi^*(y\mid x)}{\pi_{\text{ref}}(y\mid x)} + \beta\log Z(x).$$
#
# Every policy $\pi$ therefore defines an *implicit reward* $\beta\log\pi/\pi_{\text{ref}}$, and
# the optimal policy's implicit reward is the true reward up to $\beta\log Z(x)$, which depends on
# the prompt but not on the response. `dpo_loss` returns exactly these implicit rewards
# (`chosen_rewards`, `rejected_rewards`); feeding it $\pi^*$ recovers $r - \beta\log Z$:

# %%
log_pi_star = np.log(pi_star)
out = dpo_loss(log_pi_star, log_pi_star, ref, ref, beta=beta)
implicit = np.asarray(out.chosen_rewards)
log_z = np.log(np.sum(np.exp(ref + r / beta)))
np.testing.assert_allclose(implicit, r - beta * log_z, **TOL)
np.testing.assert_allclose(
    implicit - implicit.mean(), r - r.mean(), **TOL
)  # the same up to a shift
print(f"beta log Z = {beta * log_z:.4f};  r - implicit reward =", np.round(r - implicit, 4))

# %% [markdown]
# ## 2. $Z(x)$ cancels in the Bradley–Terry difference
#
# Preferences only ever compare two responses to the same prompt. Under Bradley–Terry (notebook
# 01), $P(y_w \succ y_l\mid x) = \sigma\big(r(x,y_w) - r(x,y_l)\big)$, and substituting the
# inverted reward,
#
# $$r(x,y_w) - r(x,y_l) = \beta\log\frac{\pi^*(y_w\mid x)}{\pi_{\text{ref}}(y_w\mid x)}
#    + \cancel{\beta\log Z(x)} - \beta\log\frac{\pi^*(y_l\mid x)}{\pi_{\text{ref}}(y_l\mid x)}
#    - \cancel{\beta\log Z(x)}.$$
#
# So the preference probability is a function of the policy alone. Replacing $\pi^*$ by a
# trainable $\pi_\theta$ and maximising the likelihood of the observed preferences gives the DPO
# loss. The check: for all $K^2$ ordered pairs of arms, the Bradley–Terry loss of the true rewards
# (`bradley_terry_loss`) equals the DPO loss of $\pi^*$ (`dpo_loss`) — two library functions that
# share no code path, related only by this derivation.

# %%
win, lose = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
win, lose = win.ravel(), lose.ravel()  # all ordered pairs (chosen, rejected)
bt = jax.jit(L.bradley_terry_loss)(r[win], r[lose])
dpo_star = dpo_loss(log_pi_star[win], log_pi_star[lose], ref[win], ref[lose], beta=beta).loss
np.testing.assert_allclose(dpo_star, bt, **TOL)
# A policy other than pi* does not reproduce the true preferences.
dpo_ref = dpo_loss(ref[win], ref[lose], ref[win], ref[lose], beta=beta).loss
assert np.abs(np.asarray(dpo_ref) - np.asarray(bt)).max() > 0.3
print(f"max |DPO(pi*) - BT(r)| over {K * K} pairs: {np.abs(dpo_star - bt).max():.1e}")

# %% [markdown]
# ## 3. The loss and its gradient
#
# With the margin $h = \log\frac{\pi_\theta(y_w)}{\pi_{\text{ref}}(y_w)} -
# \log\frac{\pi_\theta(y_l)}{\pi_{\text{ref}}(y_l)}$ and $\frac{d}{du}\log\sigma(u) = \sigma(-u)$,
#
# $$\nabla_\theta\mathcal{L}_{\text{DPO}} = -\beta\,\sigma(-\beta h)\,
#   \big[\nabla_\theta\log\pi_\theta(y_w\mid x) - \nabla_\theta\log\pi_\theta(y_l\mid x)\big].$$
#
# The update raises the chosen response's log-probability and lowers the rejected one's, weighted
# by $\sigma(-\beta h)$: the probability the implicit reward model currently assigns to the
# *wrong* order. Pairs it already ranks confidently barely move; misranked pairs get up to
# $\beta$. We check the two partial derivatives of `dpo_loss` against
# $\mp\beta\,\sigma(-\beta h)$ on random inputs, and that the reference log-probs are not
# differentiated through the implicit rewards (they are diagnostics).

# %%
rng = np.random.default_rng(0)
pc, pr, rc, rr = (rng.normal(-10, 2, size=64).astype(np.float32) for _ in range(4))
h = (pc - rc) - (pr - rr)
grads = jax.jit(
    jax.grad(lambda a, b: L.dpo_loss(a, b, rc, rr, beta=beta).loss.sum(), argnums=(0, 1))
)
g_chosen, g_rejected = grads(pc, pr)
weight = 1 / (1 + np.exp(beta * h))  # sigma(-beta h)
np.testing.assert_allclose(g_chosen, -beta * weight, **TOL)
np.testing.assert_allclose(g_rejected, beta * weight, **TOL)
np.testing.assert_allclose(
    dpo_loss(pc, pr, rc, rr, beta=beta).loss, np.log1p(np.exp(-beta * h)), **TOL
)

# %% [markdown]
# **The worked example.** Policy/reference log-probs $-8.2/-8.5$ for the chosen response and
# $-9.5/-9.1$ for the rejected one, $\beta = 0.1$: the margin is $0.3 - (-0.4) = 0.7$, the logit
# $0.07$, $\sigma(0.07) = 0.517$ and the loss $0.659$. The implicit rewards are $+0.03$ and
# $-0.04$. (The exercise that follows it in the lesson, $-6.2/-6.5$ and $-7.8/-7.1$, has margin
# $1.0$ and loss $-\log\sigma(0.1) = 0.644$.)
#
# **At initialisation** the policy is the reference, every margin is 0 and the loss is exactly
# $\log 2 = 0.693$ — with a non-zero gradient $-\beta/2$ per unit of margin, so training starts
# at full speed (a loss stuck at 0.693 means the policy is not moving, not that the gradient
# vanished).

# %%
ex = dpo_loss(jnp.array([-8.2, -6.2]), jnp.array([-9.5, -7.8]), jnp.array([-8.5, -6.5]),
              jnp.array([-9.1, -7.1]), beta=0.1)  # fmt: skip
np.testing.assert_allclose(ex.loss, [0.659, 0.644], atol=5e-4)
np.testing.assert_allclose(np.exp(-ex.loss[0]), 0.517, atol=5e-4)
np.testing.assert_allclose(ex.chosen_rewards, [0.03, 0.03], atol=1e-6)
np.testing.assert_allclose(ex.rejected_rewards, [-0.04, -0.07], atol=1e-6)

z = jnp.zeros(2)
np.testing.assert_allclose(dpo_loss(z, z, z, z, beta=0.1).loss, np.log(2.0), rtol=1e-6)
g0 = grads(rc, rr)  # policy = reference on all 64 random pairs (beta = 0.5 here)
np.testing.assert_allclose(g0[0], -beta / 2, rtol=1e-6)
np.testing.assert_allclose(g0[1], beta / 2, rtol=1e-6)
print(f"worked example: loss {float(ex.loss[0]):.3f}, P(chosen) {float(np.exp(-ex.loss[0])):.3f}")

margins = np.linspace(-10, 10, 201)
fig, ax = plt.subplots(figsize=(5, 3))
zero_m = np.zeros_like(margins)
curve = dpo_loss(margins, zero_m, zero_m, zero_m, beta=0.5).loss
ax.plot(margins, curve, label=r"loss $-\log\sigma(\beta h)$")
ax.plot(margins, 1 / (1 + np.exp(0.5 * margins)), label=r"gradient weight $\sigma(-\beta h)$")
ax.axvline(0, color="0.8")
ax.set(xlabel=r"log-ratio margin $h$ ($\beta = 0.5$)", title="DPO: misranked pairs weigh most")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 4. Training DPO on the bandit: $\pi_\theta \to \pi^*$
#
# The derivation promises more than a loss: if the preference data follow Bradley–Terry under
# $r$, the policy that minimises the DPO loss *is* $\pi^*$. We draw 4,000 preference pairs from
# the bandit (two distinct arms sampled from $\pi_{\text{ref}}$, labelled by Bradley–Terry under
# the true reward, `Bandit.pairwise_records`), parameterise $\pi_\theta = \mathrm{softmax}(\theta)$
# over the arms starting at $\pi_{\text{ref}}$, and minimise the mean of `prefjax.losses.dpo_loss`
# with Adam — a loss-level loop (the policy is a table, so 600 full-batch steps take a fraction of
# a second). The next section repeats the experiment with the library's own train step and a
# transformer policy.
#
# $\mathrm{KL}(\pi_\theta\,\|\,\pi^*)$ falls from its starting value
# $\mathrm{KL}(\pi_{\text{ref}}\,\|\,\pi^*)$ to the small floor set by the finite sample (with
# more pairs it keeps shrinking).

# %%
records = bandit.pairwise_records(4000, seed=0)
arm_index = {a: i for i, a in enumerate(bandit.arms)}
chosen = jnp.array([arm_index[rec["chosen"]] for rec in records])
rejected = jnp.array([arm_index[rec["rejected"]] for rec in records])
ref_j = jnp.asarray(ref, jnp.float32)
log_pi_star_j = jnp.asarray(log_pi_star, jnp.float32)


def mean_dpo_loss(theta):
    logp = jax.nn.log_softmax(theta)  # [K] log pi_theta over the arms
    out = L.dpo_loss(logp[chosen], logp[rejected], ref_j[chosen], ref_j[rejected], beta=beta)
    return out.loss.mean()


def kl_to_optimum(theta):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logp) * (logp - log_pi_star_j))


@jax.jit
def train(theta):
    opt = optax.adam(0.05)

    def step(carry, _):
        theta, state = carry
        loss, g = jax.value_and_grad(mean_dpo_loss)(theta)
        updates, state = opt.update(g, state)
        return (optax.apply_updates(theta, updates), state), (loss, kl_to_optimum(theta))

    (theta, _), (losses, kls) = jax.lax.scan(step, (theta, opt.init(theta)), length=600)
    return theta, losses, kls


theta, losses, kls = train(ref_j)
pi_theta = np.asarray(jax.nn.softmax(theta))
kl_start, kl_end = float(kls[0]), float(kl_to_optimum(theta))
print(f"DPO loss {float(losses[0]):.4f} -> {float(losses[-1]):.4f}")
print(f"KL(pi_theta || pi*) {kl_start:.4f} -> {kl_end:.5f}")
np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-5)  # starts at log 2
assert kl_end < 0.01 and kl_end < kl_start / 20
np.testing.assert_allclose(pi_theta, pi_star, atol=0.03)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].semilogy(np.asarray(kls))
axes[0].set(xlabel="Adam step", ylabel=r"KL$(\pi_\theta \| \pi^*)$", title="DPO on the bandit")
x = np.arange(K)
axes[1].bar(x - 0.27, np.exp(ref), 0.27, label=r"$\pi_{ref}$")
axes[1].bar(x, pi_theta, 0.27, label=r"$\pi_\theta$ (DPO)")
axes[1].bar(x + 0.27, pi_star, 0.27, label=r"$\pi^*$ (closed form)")
axes[1].set_xticks(x, [f"{a}\nr={v:+.2f}" for a, v in zip(bandit.arms, r, strict=True)])
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### The same with the library's train step
#
# `prefjax.train.dpo` is what a real run uses: one jitted, sharded step that forwards a
# transformer on chosen and rejected responses, sums their token log-probs, calls
# `prefjax.losses.dpo_loss` against a frozen copy of the initial model, and updates with AdamW.
# Here it trains the `tiny` preset (a 2-layer byte-level transformer) on the same bandit, whose
# arms are single-token responses after the prompt. The reference policy is now the initial
# model's distribution over the arms, so the target is
# $\pi^* \propto \pi_{\text{ref}}^{\text{model}}\,e^{r/\beta}$
# (`Bandit.with_reference`, read off with `prefjax.train.evaluation.bandit_policy`). 80 steps
# of 64 pairs; compiling the step takes most of this cell's time.

# %%
config = dpo_configs.get_config("tiny")
config.data.task, config.data.batch_size = "bandit", 64
config.algorithm.beta = beta
# Plain DPO: the launcher's default RPO term (rpo_alpha = 1) would move the optimum away from pi*.
config.algorithm.rpo_alpha = 0.0
config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 0
config.train.num_steps = 80

tokenizer = ByteTokenizer()
model = common.build_model(config, key=jax.random.key(0))
model_ref = evaluation.bandit_policy(model, model.params, bandit, tokenizer)  # [1, K] log-probs
model_bandit = bandit.with_reference(model_ref)
dataset = model_bandit.pairwise_dataset(tokenizer, 4000, seed=0)
run = train_setup.build_setup(
    config, model, sharding.single_device_mesh(), jax.random.key(1), dpo_train
)
batches = BatchIterator(dataset, 64, seed=0, process_index=0, process_count=1)

state, history = run.state, []
for step in range(config.train.num_steps):
    state, metrics = run.train_step(state, next(batches), run.frozen, jax.random.key(step))
    if step % 16 == 0 or step == config.train.num_steps - 1:
        m = evaluation.bandit_metrics(model, state.params, model_bandit, tokenizer, beta)
        history.append((step, float(metrics["loss"]), m["bandit/kl_to_optimum"]))
for step, loss, kl in history:
    print(f"step {step:3d}  loss {loss:.4f}  KL(pi_theta || pi*) {kl:.4f}")
np.testing.assert_allclose(history[0][1], np.log(2.0), rtol=1e-4)  # policy = reference at step 0
assert history[-1][2] < 0.05 and history[-1][2] < history[0][2] / 8

# %% [markdown]
# ## 5. Rankings of $K > 2$: the Plackett–Luce form
#
# With a full ranking $y_{\tau_1}\succ\dots\succ y_{\tau_K}$ the Plackett–Luce model (notebook 01)
# replaces Bradley–Terry: $P(\tau) = \prod_k e^{r(y_{\tau_k})}/\sum_{j\ge k}e^{r(y_{\tau_j})}$.
# Substituting $r = \beta\log\pi^*/\pi_{\text{ref}} + \beta\log Z$, the $e^{\beta\log Z}$ factor
# appears in every numerator and every term of every denominator, and cancels again. The
# listwise DPO loss is Plackett–Luce on the implicit rewards (`listwise_dpo_loss`); at $K = 2$ it
# is `dpo_loss`, and on $\pi^*$ it equals the Plackett–Luce loss of the true rewards.

# %%
perms = np.stack([rng.permutation(K) for _ in range(16)])  # 16 random rankings, best first
listwise = jax.jit(L.listwise_dpo_loss)
pl_true = jax.jit(L.plackett_luce_loss)(r[perms])
np.testing.assert_allclose(listwise(log_pi_star[perms], ref[perms], beta=beta).loss, pl_true, **TOL)
# Z cancels: shifting every implicit reward of a list by the same constant changes nothing.
np.testing.assert_allclose(
    listwise(log_pi_star[perms] + 3.0, ref[perms], beta=beta).loss, pl_true, **TOL
)
# K = 2 is DPO.
pair = perms[:, :2]
np.testing.assert_allclose(
    listwise(log_pi_star[pair] - 1.0, ref[pair], beta=beta).loss,
    dpo_loss(log_pi_star[pair[:, 0]] - 1.0, log_pi_star[pair[:, 1]] - 1.0, ref[pair[:, 0]],
             ref[pair[:, 1]], beta=beta).loss,
    **TOL,
)  # fmt: skip
print("listwise DPO on pi* = Plackett-Luce of the true rewards, for 16 rankings of", K)

# %% [markdown]
# **Summary.** DPO is maximum likelihood of the preference data under Bradley–Terry (or
# Plackett–Luce), with the reward model replaced by the policy's implicit reward
# $\beta\log\pi_\theta/\pi_{\text{ref}}$; $Z(x)$ cancels because preferences compare responses to
# the same prompt. Its gradient weights each pair by how wrong the implicit reward currently is,
# and on data that follow the model its minimiser is the KL-regularised optimum $\pi^*$ — no
# reward model, no sampling, no RL. Notebook 07 looks at what happens when the data do *not*
# follow the model (deterministic or noisy preferences) and at the variants built for those cases.

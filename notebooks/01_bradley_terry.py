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
# # 01 · Bradley–Terry and reward models
#
# **Derived here.** How a scalar reward model is learned from pairwise human judgements: the
# Bradley–Terry model turns "A was preferred to B" into a probability that depends only on the
# reward *difference*, $P(A\succ B) = \sigma(r_A - r_B)$, and maximum likelihood turns it into
# the reward-model loss $-\log\sigma(r_w - r_l)$. We check the worked numbers with
# `prefjax.losses.bradley_terry_loss`, fit a reward model by maximum likelihood on the built-in
# sequence task and recover its gold reward up to a constant, extend the model to full rankings
# (Plackett–Luce, which is Bradley–Terry at $K = 2$), and measure the accuracy ceiling that label
# noise puts on any reward model.

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
from prefjax.data.tasks import Bandit, RepeatTask, preference_probability

TOL = dict(rtol=1e-5, atol=1e-6)
# The losses are pure and unjitted; we jit them once, as a train step does.
bt_loss = jax.jit(L.bradley_terry_loss)
pl_loss = jax.jit(L.plackett_luce_loss)

# %% [markdown]
# ## 1. From a pairwise comparison to the logistic form
#
# Bradley and Terry (1952) give every item $i$ a positive strength $s_i$ and model a comparison
# as $P(i\succ j) = s_i/(s_i + s_j)$. Writing $s_i = e^{r_i}$ and dividing through by $e^{r_i}$,
#
# $$P(i\succ j) = \frac{e^{r_i}}{e^{r_i} + e^{r_j}} = \frac{1}{1 + e^{-(r_i - r_j)}}
#   = \sigma(r_i - r_j).$$
#
# Three consequences: only differences of rewards are observable (adding a constant to every
# reward changes nothing); $P(i\succ j) + P(j\succ i) = 1$; and the negative log-likelihood of an
# observed preference $y_w\succ y_l$ is the reward-model loss
#
# $$\ell = -\log\sigma(r_w - r_l), \qquad
#   \frac{\partial\ell}{\partial r_w} = -\big(1 - \sigma(r_w - r_l)\big)
#   = -\frac{\partial\ell}{\partial r_l}.$$
#
# **Worked numbers.** Rewards 2.0 (A) and 0.5 (B): $P(A\succ B) = \sigma(1.5) = 0.818$; if the
# human picked A the loss is $-\log 0.818 = 0.201$, had they picked B it would be
# $-\log(1 - \sigma(1.5)) = 1.701$ (the lesson's 1.704 is $-\log$ of the rounded 0.182).

# %%
r_a, r_b = jnp.array([2.0]), jnp.array([0.5])
p_ab = float(jnp.exp(-bt_loss(r_a, r_b))[0])
np.testing.assert_allclose(p_ab, 0.818, atol=5e-4)
np.testing.assert_allclose(p_ab, np.exp(2.0) / (np.exp(2.0) + np.exp(0.5)), rtol=1e-6)  # s/(s+s')
np.testing.assert_allclose(bt_loss(r_a, r_b), [0.201], atol=5e-4)
np.testing.assert_allclose(bt_loss(r_b, r_a), [-np.log(1 - p_ab)], rtol=1e-5)
np.testing.assert_allclose(bt_loss(r_b, r_a), [1.701], atol=5e-4)
np.testing.assert_allclose(
    np.exp(-bt_loss(r_a, r_b)) + np.exp(-bt_loss(r_b, r_a)), [1.0], rtol=1e-6
)
np.testing.assert_allclose(bt_loss(r_a + 7.0, r_b + 7.0), bt_loss(r_a, r_b), rtol=1e-6)  # shift

grad_w, grad_l = jax.grad(lambda rw, rl: L.bradley_terry_loss(rw, rl).sum(), argnums=(0, 1))(
    r_a, r_b
)
np.testing.assert_allclose(grad_w, [-(1 - p_ab)], rtol=1e-5)  # -0.182: push r_w up ...
np.testing.assert_allclose(grad_l, [1 - p_ab], rtol=1e-5)  # ... and r_l down, equally
print(
    f"P(A > B) = {p_ab:.3f}, loss = {float(bt_loss(r_a, r_b)[0]):.3f},",
    f"dloss/dr_A = {float(grad_w[0]):.3f}",
)

# %% [markdown]
# Two variants practitioners use. Llama 2 asks for a *margin* $m$ on pairs rated as clearly
# different, $-\log\sigma(r_w - r_l - m)$; label smoothing $\epsilon$ trains against the target
# $1-\epsilon$ instead of 1, $-(1-\epsilon)\log\sigma(\Delta) - \epsilon\log\sigma(-\Delta)$,
# which keeps a finite optimum $\Delta^* = \log\frac{1-\epsilon}{\epsilon}$ when the same pair is
# always labelled the same way.

# %%
delta = np.linspace(-4, 4, 9).astype(np.float32)
zero = np.zeros_like(delta)
log_sig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731  (reference log-sigmoid, float64)
np.testing.assert_allclose(
    L.bradley_terry_loss(delta, zero, margin=1.0), -log_sig(delta - 1.0), **TOL
)
np.testing.assert_allclose(
    L.bradley_terry_loss(delta, zero, label_smoothing=0.1),
    -0.9 * log_sig(delta) - 0.1 * log_sig(-delta),
    **TOL,
)
smooth_grad = jax.grad(lambda d: L.bradley_terry_loss(d, jnp.zeros(1), label_smoothing=0.1).sum())
np.testing.assert_allclose(smooth_grad(jnp.array([np.log(0.9 / 0.1)])), [0.0], atol=1e-6)

# %% [markdown]
# ## 2. Maximum likelihood recovers the gold reward up to a constant
#
# The built-in sequence task (`RepeatTask`) asks for `n` copies of a letter (`"b*3="` →
# `"bbb"`). Its gold reward is graded: with `k` copies of the letter and `m` other characters,
# $r = \max(0, 1 - (|k-n| + m)/n)$. Preference pairs are two responses of a base policy to the
# same prompt, labelled by Bradley–Terry under the gold reward at temperature $\tau = 0.1$, i.e.
# $P(y_1\succ y_2) = \sigma\big((r_1 - r_2)/\tau\big)$.
#
# We fit a reward model by maximum likelihood: minimise the mean `bradley_terry_loss` over 6,000
# pairs. To isolate what maximum likelihood can identify from what a network can represent, the
# model is a table $\hat r[n, k, m]$ over the three quantities the gold reward depends on (a tiny
# L2 penalty keeps entries that no pair pins down at 0). The derivation predicts what comes out:
#
# * only differences between responses **to prompts with the same** $n$ are ever observed, so
#   $\hat r$ can match the gold reward only up to one additive constant per $n$;
# * the labels used $(r_1 - r_2)/\tau$, so $\hat r \approx r/\tau$ + constant: the fitted scale is
#   the labellers' inverse temperature (Bradley–Terry cannot tell "large reward gaps" from
#   "decisive labellers").

# %%
task = RepeatTask()  # default: temperature 0.1, no extra label flips
records = task.pairwise_records(6000, seed=0)


def features(prompt, response):
    letter, n = task.parse_prompt(prompt)
    k = response.count(letter)
    return n, k, len(response) - k


SHAPE = (task.max_count + 1, task.max_count + 3, task.max_count + 3)  # n, k, m
idx_c = np.ravel_multi_index(
    np.array([features(x["prompt"], x["chosen"]) for x in records]).T, SHAPE
)
idx_r = np.ravel_multi_index(
    np.array([features(x["prompt"], x["rejected"]) for x in records]).T, SHAPE
)
gold = np.full(np.prod(SHAPE), np.nan)  # gold reward of each table entry, read off the records
gold[idx_c] = [x["chosen_gold_reward"] for x in records]
gold[idx_r] = [x["rejected_gold_reward"] for x in records]


def rm_loss(table):
    return L.bradley_terry_loss(table[idx_c], table[idx_r]).mean() + 1e-5 * jnp.sum(table**2)


@jax.jit
def fit_reward_model():
    opt = optax.adam(0.1)

    def step(carry, _):
        table, state = carry
        loss, g = jax.value_and_grad(rm_loss)(table)
        updates, state = opt.update(g, state)
        return (optax.apply_updates(table, updates), state), loss

    table = jnp.zeros(np.prod(SHAPE))
    (table, _), losses = jax.lax.scan(step, (table, opt.init(table)), length=2000)
    return table, losses


table, rm_losses = fit_reward_model()
table = np.asarray(table)
counts = np.bincount(np.concatenate([idx_c, idx_r]), minlength=np.prod(SHAPE))
n_of = np.unravel_index(np.arange(np.prod(SHAPE)), SHAPE)[0]
seen = counts >= 20  # entries compared often enough to be estimated

# Centre fitted and gold rewards within each n (the unidentified constants), weighting by use.
fitted_c, gold_c, weight = [], [], []
for n in range(1, task.max_count + 1):
    sel = seen & (n_of == n)
    w = counts[sel]
    fitted_c.append(task.temperature * (table[sel] - np.average(table[sel], weights=w)))
    gold_c.append(gold[sel] - np.average(gold[sel], weights=w))
    weight.append(w)
fitted_c, gold_c, weight = map(np.concatenate, (fitted_c, gold_c, weight))
slope = (gold_c @ fitted_c) / (gold_c @ gold_c)
corr = np.corrcoef(gold_c, fitted_c)[0, 1]
print(
    f"{seen.sum()} table entries; tau * fitted vs gold: slope {slope:.3f}, correlation {corr:.3f}"
)
assert corr > 0.95 and abs(slope - 1.0) < 0.2

# %%
fig, ax = plt.subplots(figsize=(4.5, 4))
ax.scatter(gold_c, fitted_c, s=4 + weight / 20, alpha=0.6)
lim = [gold_c.min() - 0.05, gold_c.max() + 0.05]
ax.plot(lim, lim, "k:", lw=1, label="y = x")
ax.set(xlabel="gold reward (centred within n)", ylabel=r"$\tau\,\hat r$ (centred within n)",
       title="Bradley-Terry MLE on the sequence task")  # fmt: skip
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Rankings: Plackett–Luce
#
# With $K$ responses ranked best-first, $y_{\tau_1}\succ y_{\tau_2}\succ\dots\succ y_{\tau_K}$,
# the Plackett–Luce model builds the ranking by repeated Bradley–Terry-style choices: the best is
# chosen from all $K$ with softmax probabilities, the second from the remaining $K-1$, and so on,
#
# $$P(\tau) = \prod_{k=1}^{K}\frac{e^{r_{\tau_k}}}{\sum_{j\ge k}e^{r_{\tau_j}}}, \qquad
#   \ell_{\text{PL}} = -\sum_{k=1}^{K}\Big(r_{\tau_k} - \log\sum_{j\ge k}e^{r_{\tau_j}}\Big).$$
#
# At $K = 2$ the product has one non-trivial factor,
# $e^{r_1}/(e^{r_1}+e^{r_2}) = \sigma(r_1 - r_2)$: Bradley–Terry. It is a distribution over the
# $K!$ orderings, and rewards are again identified only up to a constant. `plackett_luce_loss`
# is checked on all of these, and a ragged list (padding slots masked out) equals the unpadded
# one.

# %%
scores = np.array([1.2, -0.3, 0.5, 2.0], np.float32)
perms = np.array(list(itertools.permutations(range(4))))  # all 24 rankings
nll = np.asarray(pl_loss(scores[perms]))
np.testing.assert_allclose(np.exp(-nll).sum(), 1.0, rtol=1e-5)  # a distribution over rankings
np.testing.assert_allclose(pl_loss(scores[perms] + 5.0), nll, rtol=1e-5)  # shift invariance


def pl_probability(order):  # the product formula, written out in float64
    s = scores[list(order)].astype(np.float64)
    return np.prod([np.exp(s[k]) / np.exp(s[k:]).sum() for k in range(len(s))])


np.testing.assert_allclose(np.exp(-nll), [pl_probability(p) for p in perms], rtol=1e-5)
# The marginal probability of ranking an item first is its softmax probability.
first = np.array([np.exp(-nll)[perms[:, 0] == i].sum() for i in range(4)])
np.testing.assert_allclose(first, np.exp(scores) / np.exp(scores).sum(), rtol=1e-5)

pairs = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
np.testing.assert_allclose(pl_loss(pairs), bt_loss(pairs[:, 0], pairs[:, 1]), **TOL)  # K = 2
padded = np.concatenate([pairs, np.full((8, 2), 1e3, np.float32)], axis=1)  # garbage padding
mask = np.array([[1, 1, 0, 0]] * 8)
np.testing.assert_allclose(pl_loss(padded, mask=mask), bt_loss(pairs[:, 0], pairs[:, 1]), **TOL)

# %% [markdown]
# The built-in tasks sample rankings from exactly this model (scores $r/\tau$). On the bandit,
# ranking all $K$ arms in each of 4,000 records, the arm ranked first should follow
# $\mathrm{softmax}(r/\tau)$:

# %%
bandit = Bandit.make(num_arms=4, seed=0)  # temperature 1
rankings = bandit.listwise_records(4000, num_responses=4, seed=0)
top = np.array([bandit.arms.index(x["responses"][x["ranking"][0]]) for x in rankings])
freq = np.bincount(top, minlength=4) / len(top)
want = np.exp(bandit.rewards[0]) / np.exp(bandit.rewards[0]).sum()
se = np.sqrt(want * (1 - want) / len(top))
assert np.all(np.abs(freq - want) < 4 * se), (freq, want)
print("top-1 frequency", np.round(freq, 3), " softmax(r)", np.round(want, 3))

# %% [markdown]
# ## 4. Label noise and the accuracy ceiling
#
# Preference labels are noisy even when the labellers are right on average: under Bradley–Terry,
# the response with the higher reward is chosen only with probability $\sigma(|\Delta r|/\tau)$.
# On top of that, a fraction $\varepsilon$ of labels may be flipped outright, so the label agrees
# with the better response with probability
# $p = (1-\varepsilon)\,\sigma(|\Delta r|/\tau) + \varepsilon\,\sigma(-|\Delta r|/\tau)$.
# No reward model — not even the gold reward itself — can predict a coin flip, so the best
# achievable preference accuracy on such data is
#
# $$\text{ceiling} = \mathbb{E}_{\text{pairs}}\big[\max(p, 1 - p)\big],$$
#
# (ties count one half). We compute it from `preference_probability` for the pairs actually
# drawn, and measure the gold reward's accuracy on datasets with $\varepsilon$ = 0, 0.1, 0.2,
# 0.3: they agree within sampling error, and the fitted reward model of §2 — judged on fresh
# labels — comes close to the ceiling but cannot beat it.

# %%
rows = []
for flip in (0.0, 0.1, 0.2, 0.3):
    noisy = RepeatTask(flip_prob=flip).pairwise_records(3000, seed=1)
    rc = np.array([x["chosen_gold_reward"] for x in noisy])
    rr = np.array([x["rejected_gold_reward"] for x in noisy])
    p = preference_probability(rc, rr, temperature=task.temperature, flip_prob=flip)
    ceiling = np.mean(np.maximum(p, 1 - p))
    gold_acc = np.mean(np.where(rc == rr, 0.5, rc > rr))
    se = np.sqrt(ceiling * (1 - ceiling) / len(noisy))
    assert abs(gold_acc - ceiling) < 4 * se, (flip, gold_acc, ceiling)
    ic = np.ravel_multi_index(
        np.array([features(x["prompt"], x["chosen"]) for x in noisy]).T, SHAPE
    )
    ir = np.ravel_multi_index(
        np.array([features(x["prompt"], x["rejected"]) for x in noisy]).T, SHAPE
    )
    rm_acc = np.mean(np.where(table[ic] == table[ir], 0.5, table[ic] > table[ir]))
    assert rm_acc < ceiling + 4 * se
    rows.append((flip, ceiling, gold_acc, rm_acc))
    print(
        f"flip {flip:.1f}: ceiling {ceiling:.3f}  gold reward {gold_acc:.3f}",
        f" fitted RM {rm_acc:.3f}",
    )
rows = np.array(rows)
assert np.all(np.diff(rows[:, 1]) < 0)  # more flips, lower ceiling
# Flips are independent of the pair, so the ceiling falls linearly: c(eps) = c0 - eps (2 c0 - 1).
np.testing.assert_allclose(rows[:, 1], rows[0, 1] - rows[:, 0] * (2 * rows[0, 1] - 1), atol=0.02)

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot(rows[:, 0], rows[:, 1], "k-", label="ceiling (predicted)")
ax.plot(rows[:, 0], rows[:, 2], "o", label="gold reward (measured)")
ax.plot(rows[:, 0], rows[:, 3], "s", label="fitted reward model")
ax.set(xlabel=r"label flip rate $\varepsilon$", ylabel="preference accuracy",
       title="No reward model beats the label noise")  # fmt: skip
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **Summary.** Bradley–Terry is a logistic model on reward differences; its likelihood is the
# reward-model loss. Maximum likelihood identifies rewards only up to a per-prompt constant and
# in units of the labellers' temperature, and Plackett–Luce extends the same construction to
# rankings. A held-out preference accuracy must be read against the ceiling the label noise
# allows, not against 100 %. Notebook 03 reuses this likelihood with the policy's own implicit
# reward in place of $\hat r$.

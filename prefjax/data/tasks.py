r"""Built-in synthetic tasks with known ground-truth rewards.

Three tasks, all generated deterministically from a seed and small enough to train a tiny
byte-level model on in about a minute on a CPU:

* :class:`Bandit` — a KL-regularised contextual bandit. A few prompts, ``K`` arms that are
  single-token responses (letters), a known reference policy :math:`\pi_{ref}(y|x)` over the arms
  and a known reward :math:`r(x, y)`. The maximiser of
  :math:`\mathbb{E}_{\pi}[r] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_{ref})` is
  :math:`\pi^*(y|x) \propto \pi_{ref}(y|x)\exp(r(x,y)/\beta)` (DPO paper, Eq. 4), so a trained
  policy can be compared with the exact optimum.
* :class:`RepeatTask` — a sequence task. The prompt ``"c*n="`` asks for ``n`` copies of the letter
  ``c`` (e.g. ``"b*3="`` -> ``"bbb"``); the gold reward is graded,
  :math:`r = \max(0,\ 1 - (|k - n| + m)/n)` with ``k`` copies of ``c`` and ``m`` other
  characters in the response, so 1 is perfect and near misses score in between.
* :class:`ArithmeticTask` — a multi-step task with known per-step correctness, for process
  reward models. The prompt ``"s+dxn="`` asks to add ``d`` to ``s`` ``n`` times, one digit per
  step modulo 10 (``"3+2x4="`` -> steps ``5, 7, 9, 1``); step ``k`` is correct when the steps up
  to it all equal the running values (the first-error labelling of PRM800K / Math-Shepherd), and
  the gold reward is the fraction of the ``n`` steps solved before the first error.

Preferences are labelled by the Bradley-Terry model under the true reward with a known
temperature :math:`\tau` and optional symmetric flip rate :math:`\varepsilon`:

.. math:: P(y_1 \succ y_2) = (1-\varepsilon)\,\sigma\big((r_1 - r_2)/\tau\big)
          + \varepsilon\,\sigma\big((r_2 - r_1)/\tau\big)

(:math:`\tau = 0` labels by the larger reward), so the label noise of every dataset is known.
Both tasks produce pairwise, listwise (Plackett-Luce rankings), unpaired (KTO), SFT and prompt
datasets as plain records, ready for :func:`prefjax.data.tokenize.tokenize` or through the
``*_dataset`` helpers. Pairwise records carry ``chosen_gold_reward`` / ``rejected_gold_reward``,
which travel into batches.
"""

from __future__ import annotations

import dataclasses
import re
import string

import numpy as np

from prefjax.data.dataset import TokenizedDataset
from prefjax.data.tokenize import tokenize


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def _log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def preference_probability(r1, r2, *, temperature: float = 1.0, flip_prob: float = 0.0):
    """Bradley-Terry probability that a response with reward ``r1`` is preferred to ``r2``.

    >>> float(preference_probability(1.0, 0.0))  # sigma(1)
    0.7310585786300049
    >>> float(preference_probability(1.0, 0.0, temperature=0.0))  # noiseless
    1.0
    """
    d = np.asarray(r1, np.float64) - np.asarray(r2, np.float64)
    if temperature == 0:
        p = np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))
    else:
        p = _sigmoid(d / temperature)
    return (1.0 - flip_prob) * p + flip_prob * (1.0 - p)


def _check_noise(temperature, flip_prob):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 <= flip_prob <= 0.5:
        raise ValueError(f"flip_prob must be in [0, 0.5], got {flip_prob}")


def _plackett_luce_ranking(rng, rewards, temperature):
    """Best-first ranking sampled from Plackett-Luce with scores ``rewards / temperature``
    (Gumbel-max: sorting scores plus Gumbel noise samples the PL distribution exactly)."""
    rewards = np.asarray(rewards, np.float64)
    if temperature == 0:
        return list(np.argsort(-rewards, kind="stable"))
    g = rng.gumbel(size=len(rewards))
    return list(np.argsort(-(rewards / temperature + g), kind="stable"))


class _TaskDatasets:
    """``*_dataset`` helpers shared by the tasks: records -> :class:`TokenizedDataset`."""

    _append_eos = True

    def _tok(self, kind, records, tokenizer, max_len, max_prompt_len, **kw):
        kw.setdefault("append_eos", self._append_eos)
        return tokenize(
            records, tokenizer, kind, max_len=max_len, max_prompt_len=max_prompt_len, **kw
        )

    def pairwise_dataset(
        self, tokenizer, num, *, seed=0, max_len=None, max_prompt_len=None, **kw
    ) -> TokenizedDataset:
        """Tokenised :meth:`pairwise_records` (kw: tokenize options)."""
        max_len = max_len or self.default_max_len
        return self._tok(
            "pairwise",
            self.pairwise_records(num, seed=seed),
            tokenizer,
            max_len,
            max_prompt_len,
            **kw,
        )

    def listwise_dataset(
        self, tokenizer, num, *, num_responses=4, seed=0, max_len=None, max_prompt_len=None, **kw
    ) -> TokenizedDataset:
        """Tokenised :meth:`listwise_records`."""
        max_len = max_len or self.default_max_len
        recs = self.listwise_records(num, num_responses=num_responses, seed=seed)
        return self._tok("listwise", recs, tokenizer, max_len, max_prompt_len, **kw)

    def unpaired_dataset(
        self, tokenizer, num, *, seed=0, max_len=None, max_prompt_len=None, **kw
    ) -> TokenizedDataset:
        """Tokenised :meth:`unpaired_records`."""
        max_len = max_len or self.default_max_len
        return self._tok(
            "unpaired",
            self.unpaired_records(num, seed=seed),
            tokenizer,
            max_len,
            max_prompt_len,
            **kw,
        )

    def sft_dataset(
        self, tokenizer, num, *, seed=0, max_len=None, max_prompt_len=None, **kw
    ) -> TokenizedDataset:
        """Tokenised :meth:`sft_records`."""
        max_len = max_len or self.default_max_len
        return self._tok(
            "sft", self.sft_records(num, seed=seed), tokenizer, max_len, max_prompt_len, **kw
        )

    def prompt_dataset(
        self, tokenizer, num, *, seed=0, max_prompt_len=None, **kw
    ) -> TokenizedDataset:
        """Tokenised :meth:`prompt_records` (batch them with ``pad_side="left"``)."""
        max_prompt_len = max_prompt_len or self.default_max_len
        return self._tok(
            "prompt",
            self.prompt_records(num, seed=seed),
            tokenizer,
            max_prompt_len,
            max_prompt_len,
            **kw,
        )

    def gold_rewards(self, prompts, responses) -> np.ndarray:
        """``[n]`` float32 gold rewards of string prompts and responses."""
        return np.asarray(
            [self.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)], np.float32
        )

    def gold_rewards_from_tokens(self, tokenizer, prompt_ids, response_ids) -> np.ndarray:
        """Gold rewards of token sequences (e.g. generated samples).

        ``prompt_ids`` / ``response_ids`` are sequences of token-id sequences (padding, BOS and
        everything from the first EOS on are ignored).
        """
        special = {tokenizer.pad_id, getattr(tokenizer, "bos_id", None)}
        prompts, responses = [], []
        for p, r in zip(prompt_ids, response_ids, strict=True):
            p = [int(t) for t in p if int(t) not in special]
            r = [int(t) for t in r]
            if tokenizer.eos_id in r:
                r = r[: r.index(tokenizer.eos_id)]
            r = [t for t in r if t not in special]
            prompts.append(tokenizer.decode(p))
            responses.append(tokenizer.decode(r))
        return self.gold_rewards(prompts, responses)


# ============================================================================== bandit
@dataclasses.dataclass
class Bandit(_TaskDatasets):
    """A KL-regularised bandit with single-token arms and a closed-form optimum.

    Attributes:
      prompts: ``P`` prompt strings.
      arms: ``K`` response strings, each one token under the tokenizer (letters by default).
      rewards: ``[P, K]`` true rewards :math:`r(x, y)`.
      ref_logprobs: ``[P, K]`` reference log-probabilities :math:`\\log\\pi_{ref}(y|x)` over the
        arms (a table; replace it with a model's arm log-probs via :meth:`with_reference`).

    Responses are the single arm token with no EOS appended (``append_eos=False`` in the
    ``*_dataset`` helpers), so the policy over arms is the model's next-token distribution
    after the prompt restricted to the arm tokens.

    Example:
      >>> bandit = Bandit.make(num_arms=4, seed=0)
      >>> pi = bandit.optimal_policy(beta=0.5)
      >>> pi.shape, bool(np.allclose(pi.sum(-1), 1.0))
      ((1, 4), True)
      >>> bool(np.allclose(bandit.optimal_policy(1e6), np.exp(bandit.ref_logprobs)))  # beta->inf
      True
    """

    prompts: tuple
    arms: tuple
    rewards: np.ndarray
    ref_logprobs: np.ndarray
    temperature: float = 1.0
    flip_prob: float = 0.0
    default_max_len = 32
    _append_eos = False

    def __post_init__(self):
        self.rewards = np.asarray(self.rewards, np.float64)
        self.ref_logprobs = _log_softmax(self.ref_logprobs)
        p, k = len(self.prompts), len(self.arms)
        for name in ("rewards", "ref_logprobs"):
            if getattr(self, name).shape != (p, k):
                raise ValueError(f"Bandit.{name} must be [num_prompts={p}, num_arms={k}]")
        if len(set(self.arms)) != k or len(set(self.prompts)) != p:
            raise ValueError("Bandit arms and prompts must be distinct")
        _check_noise(self.temperature, self.flip_prob)

    @classmethod
    def make(
        cls,
        num_arms: int = 8,
        num_prompts: int = 1,
        *,
        seed: int = 0,
        reward_scale: float = 1.0,
        ref_scale: float = 1.0,
        temperature: float = 1.0,
        flip_prob: float = 0.0,
    ) -> Bandit:
        """A bandit with letter arms ``A, B, ...``, rewards ``~ N(0, reward_scale^2)`` and a
        reference policy ``softmax(N(0, ref_scale^2))`` (``ref_scale=0``: uniform)."""
        if not 2 <= num_arms <= 26:
            raise ValueError(f"num_arms must be in [2, 26], got {num_arms}")
        rng = np.random.default_rng(seed)
        rewards = reward_scale * rng.standard_normal((num_prompts, num_arms))
        ref = ref_scale * rng.standard_normal((num_prompts, num_arms))
        prompts = (
            ("Pick a letter:",)
            if num_prompts == 1
            else tuple(f"Pick a letter ({i}):" for i in range(num_prompts))
        )
        return cls(
            prompts,
            tuple(string.ascii_uppercase[:num_arms]),
            rewards,
            ref,
            temperature=temperature,
            flip_prob=flip_prob,
        )

    def with_reference(self, ref_logprobs) -> Bandit:
        """A copy whose reference policy is ``ref_logprobs`` ``[P, K]`` (e.g. a model's
        log-probs of the arm tokens after each prompt; renormalised over the arms)."""
        return dataclasses.replace(self, ref_logprobs=np.asarray(ref_logprobs, np.float64))

    @property
    def num_arms(self) -> int:
        return len(self.arms)

    def arm_token_ids(self, tokenizer) -> np.ndarray:
        """``[K]`` token id of each arm; raises if an arm is not exactly one token."""
        ids = []
        for arm in self.arms:
            t = list(tokenizer.encode(arm))
            if len(t) != 1:
                raise ValueError(f"bandit arm {arm!r} encodes to {len(t)} tokens, need 1")
            ids.append(t[0])
        return np.asarray(ids, np.int32)

    def arm_logprobs(self, next_token_logits, tokenizer) -> np.ndarray:
        """Policy over arms from next-token logits ``[P, vocab]`` after each prompt:
        the arm logits renormalised over the arms, ``[P, K]``."""
        logits = np.asarray(next_token_logits, np.float64)
        return _log_softmax(logits[..., self.arm_token_ids(tokenizer)])

    # ------------------------------------------------------------------ the KL-regularised optimum
    def optimal_policy(self, beta: float, ref_logprobs=None) -> np.ndarray:
        r"""``[P, K]`` probabilities :math:`\pi^* = \mathrm{softmax}(\log\pi_{ref} + r/\beta)`."""
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        ref = self.ref_logprobs if ref_logprobs is None else _log_softmax(ref_logprobs)
        return np.exp(_log_softmax(ref + self.rewards / beta))

    def expected_reward(self, probs) -> np.ndarray:
        """``[P]`` :math:`\\mathbb{E}_{y\\sim\\pi}[r(x, y)]`."""
        return (np.asarray(probs) * self.rewards).sum(-1)

    def kl_to_reference(self, probs, ref_logprobs=None) -> np.ndarray:
        """``[P]`` :math:`\\mathrm{KL}(\\pi\\,\\|\\,\\pi_{ref})`."""
        ref = self.ref_logprobs if ref_logprobs is None else _log_softmax(ref_logprobs)
        probs = np.asarray(probs, np.float64)
        logp = np.log(np.where(probs > 0, probs, 1.0))
        return (probs * (logp - ref)).sum(-1)

    def objective(self, probs, beta: float, ref_logprobs=None) -> np.ndarray:
        """``[P]`` KL-regularised objective :math:`E_\\pi[r] - \\beta\\,KL(\\pi\\|\\pi_{ref})`;
        maximised by :meth:`optimal_policy`, where it equals
        :math:`\\beta\\log\\sum_y\\pi_{ref}(y|x)e^{r(x,y)/\\beta}`."""
        return self.expected_reward(probs) - beta * self.kl_to_reference(probs, ref_logprobs)

    # ------------------------------------------------------------------------------ gold reward
    def gold_reward(self, prompt: str, response: str) -> float:
        """True reward of ``response`` (an arm) to ``prompt``; ``nan`` for a non-arm response."""
        p = self.prompts.index(prompt)
        if response not in self.arms:
            return float("nan")
        return float(self.rewards[p, self.arms.index(response)])

    # --------------------------------------------------------------------------------- sampling
    def _sample_prompt(self, rng):
        return int(rng.integers(len(self.prompts)))

    def _base(self, base_logprobs):
        return self.ref_logprobs if base_logprobs is None else _log_softmax(base_logprobs)

    def pairwise_records(self, num: int, *, seed: int = 0, base_logprobs=None) -> list[dict]:
        """``num`` preference pairs: two distinct arms drawn from the base policy (default the
        reference), labelled by Bradley-Terry under the true reward."""
        rng = np.random.default_rng(seed)
        base = np.exp(self._base(base_logprobs))
        out = []
        for _ in range(num):
            p = self._sample_prompt(rng)
            a = int(rng.choice(self.num_arms, p=base[p]))
            w = base[p].copy()
            w[a] = 0.0
            b = int(rng.choice(self.num_arms, p=w / w.sum()))
            ra, rb = self.rewards[p, a], self.rewards[p, b]
            prob = preference_probability(
                ra, rb, temperature=self.temperature, flip_prob=self.flip_prob
            )
            if rng.random() >= prob:
                a, b, ra, rb = b, a, rb, ra
            out.append(
                {
                    "prompt": self.prompts[p],
                    "chosen": self.arms[a],
                    "rejected": self.arms[b],
                    "prompt_id": f"bandit-{p}",
                    "chosen_gold_reward": float(ra),
                    "rejected_gold_reward": float(rb),
                }
            )
        return out

    def listwise_records(
        self, num: int, *, num_responses: int = 4, seed: int = 0, base_logprobs=None
    ) -> list[dict]:
        """``num`` rankings of ``num_responses`` distinct arms (Plackett-Luce under the reward)."""
        if not 2 <= num_responses <= self.num_arms:
            raise ValueError(f"num_responses must be in [2, {self.num_arms}]")
        rng = np.random.default_rng(seed)
        base = np.exp(self._base(base_logprobs))
        out = []
        for _ in range(num):
            p = self._sample_prompt(rng)
            arms = rng.choice(self.num_arms, size=num_responses, replace=False, p=base[p])
            r = self.rewards[p, arms]
            out.append(
                {
                    "prompt": self.prompts[p],
                    "responses": [self.arms[a] for a in arms],
                    "ranking": [int(i) for i in _plackett_luce_ranking(rng, r, self.temperature)],
                    "prompt_id": f"bandit-{p}",
                }
            )
        return out

    def unpaired_records(
        self, num: int, *, seed: int = 0, base_logprobs=None, threshold: float | None = None
    ) -> list[dict]:
        """``num`` single responses labelled desirable with probability
        ``sigma((r - threshold) / temperature)`` (threshold: the base policy's mean reward)."""
        rng = np.random.default_rng(seed)
        base = np.exp(self._base(base_logprobs))
        out = []
        for _ in range(num):
            p = self._sample_prompt(rng)
            a = int(rng.choice(self.num_arms, p=base[p]))
            t = float(base[p] @ self.rewards[p]) if threshold is None else threshold
            prob = preference_probability(
                self.rewards[p, a], t, temperature=self.temperature, flip_prob=self.flip_prob
            )
            out.append(
                {
                    "prompt": self.prompts[p],
                    "completion": self.arms[a],
                    "label": int(rng.random() < prob),
                    "prompt_id": f"bandit-{p}",
                    "gold_reward": float(self.rewards[p, a]),
                }
            )
        return out

    def sft_records(self, num: int, *, seed: int = 0, base_logprobs=None) -> list[dict]:
        """``num`` demonstrations sampled from the base policy (SFT on them fits the reference)."""
        rng = np.random.default_rng(seed)
        base = np.exp(self._base(base_logprobs))
        out = []
        for _ in range(num):
            p = self._sample_prompt(rng)
            a = int(rng.choice(self.num_arms, p=base[p]))
            out.append(
                {"prompt": self.prompts[p], "completion": self.arms[a], "prompt_id": f"bandit-{p}"}
            )
        return out

    def prompt_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` prompts (cycling through the bandit's prompts in a seeded order)."""
        rng = np.random.default_rng(seed)
        return [
            {"prompt": self.prompts[p], "prompt_id": f"bandit-{p}"}
            for p in (self._sample_prompt(rng) for _ in range(num))
        ]


# ============================================================================ sequence task
_PROMPT_RE = re.compile(r"^([a-z])\*(\d+)=$")


@dataclasses.dataclass
class RepeatTask(_TaskDatasets):
    """Sequence task: write ``n`` copies of a letter; graded programmatic gold reward.

    Prompts are ``"c*n="`` for letters ``c`` in ``letters`` and counts ``n`` in
    ``1..max_count``. The base response distribution (the "SFT policy" that pairs are sampled
    from) writes ``n + d`` characters, ``d`` uniform in ``[-max_offset, max_offset]`` (at least
    one), each the target letter with probability ``p_correct`` and otherwise a random letter.

    Attributes:
      letters: alphabet of target (and distractor) letters.
      max_count: largest requested count.
      p_correct: per-character accuracy of the base distribution.
      max_offset: largest length error of the base distribution.
      temperature: Bradley-Terry label temperature (rewards lie in [0, 1]).
      flip_prob: extra symmetric label-flip rate.

    Example:
      >>> task = RepeatTask()
      >>> [round(task.gold_reward("b*3=", y), 3) for y in ("bbb", "bb", "bbab", "xyz")]
      [1.0, 0.667, 0.667, 0.0]
    """

    letters: str = "abcde"
    max_count: int = 6
    p_correct: float = 0.75
    max_offset: int = 2
    temperature: float = 0.1
    flip_prob: float = 0.0
    default_max_len = 32

    def __post_init__(self):
        if not self.letters or not set(self.letters) <= set(string.ascii_lowercase):
            raise ValueError(f"letters must be lowercase ascii letters, got {self.letters!r}")
        if not 1 <= self.max_count <= 99:
            raise ValueError(f"max_count must be in [1, 99], got {self.max_count}")
        if not 0.0 <= self.p_correct <= 1.0:
            raise ValueError(f"p_correct must be in [0, 1], got {self.p_correct}")
        _check_noise(self.temperature, self.flip_prob)

    @property
    def prompts(self) -> list[str]:
        """All ``len(letters) * max_count`` prompts."""
        return [f"{c}*{n}=" for c in self.letters for n in range(1, self.max_count + 1)]

    @staticmethod
    def parse_prompt(prompt: str) -> tuple[str, int]:
        """``"b*3="`` -> ``("b", 3)``."""
        m = _PROMPT_RE.match(prompt)
        if m is None:
            raise ValueError(f"not a RepeatTask prompt: {prompt!r}")
        return m.group(1), int(m.group(2))

    def gold_reward(self, prompt: str, response: str) -> float:
        """``max(0, 1 - (|k - n| + m) / n)``: ``k`` copies of the letter, ``m`` other characters."""
        c, n = self.parse_prompt(prompt)
        k = response.count(c)
        m = len(response) - k
        return max(0.0, 1.0 - (abs(k - n) + m) / n)

    def sample_response(self, rng, prompt: str) -> str:
        """One response from the base distribution."""
        c, n = self.parse_prompt(prompt)
        length = max(1, n + int(rng.integers(-self.max_offset, self.max_offset + 1)))
        chars = [
            c
            if rng.random() < self.p_correct
            else self.letters[int(rng.integers(len(self.letters)))]
            for _ in range(length)
        ]
        return "".join(chars)

    def _prompt(self, rng) -> str:
        c = self.letters[int(rng.integers(len(self.letters)))]
        return f"{c}*{int(rng.integers(1, self.max_count + 1))}="

    def _distinct(self, rng, prompt, k, max_tries=200):
        """``k`` distinct base responses with distinct gold rewards where possible."""
        out, rewards = [], []
        for _ in range(max_tries):
            y = self.sample_response(rng, prompt)
            r = self.gold_reward(prompt, y)
            if y not in out and r not in rewards:
                out.append(y)
                rewards.append(r)
                if len(out) == k:
                    return out, rewards
        # Few distinct rewards exist for this prompt (n = 1): accept equal rewards, distinct text.
        for _ in range(max_tries):
            y = self.sample_response(rng, prompt)
            if y not in out:
                out.append(y)
                rewards.append(self.gold_reward(prompt, y))
                if len(out) == k:
                    return out, rewards
        raise RuntimeError(f"could not sample {k} distinct responses for {prompt!r}")

    def pairwise_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` pairs of distinct base responses (distinct gold rewards whenever the prompt
        allows), labelled by Bradley-Terry under the gold reward."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            prompt = self._prompt(rng)
            (a, b), (ra, rb) = self._distinct(rng, prompt, 2)
            prob = preference_probability(
                ra, rb, temperature=self.temperature, flip_prob=self.flip_prob
            )
            if rng.random() >= prob:
                a, b, ra, rb = b, a, rb, ra
            out.append(
                {
                    "prompt": prompt,
                    "chosen": a,
                    "rejected": b,
                    "prompt_id": prompt,
                    "chosen_gold_reward": float(ra),
                    "rejected_gold_reward": float(rb),
                }
            )
        return out

    def listwise_records(self, num: int, *, num_responses: int = 4, seed: int = 0) -> list[dict]:
        """``num`` Plackett-Luce rankings (best first) of ``num_responses`` base responses."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            prompt = self._prompt(rng)
            ys, rs = self._distinct(rng, prompt, num_responses)
            ranking = _plackett_luce_ranking(rng, rs, self.temperature)
            out.append(
                {
                    "prompt": prompt,
                    "responses": ys,
                    "ranking": [int(i) for i in ranking],
                    "prompt_id": prompt,
                }
            )
        return out

    def unpaired_records(self, num: int, *, seed: int = 0, threshold: float = 0.75) -> list[dict]:
        """``num`` base responses labelled desirable with probability
        ``sigma((r - threshold) / temperature)`` (KTO's binary feedback)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            prompt = self._prompt(rng)
            y = self.sample_response(rng, prompt)
            r = self.gold_reward(prompt, y)
            prob = preference_probability(
                r, threshold, temperature=self.temperature, flip_prob=self.flip_prob
            )
            out.append(
                {
                    "prompt": prompt,
                    "completion": y,
                    "label": int(rng.random() < prob),
                    "prompt_id": prompt,
                    "gold_reward": float(r),
                }
            )
        return out

    def sft_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` demonstrations from the base distribution (SFT on them makes a reference
        policy that DPO can then improve)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            prompt = self._prompt(rng)
            out.append(
                {
                    "prompt": prompt,
                    "completion": self.sample_response(rng, prompt),
                    "prompt_id": prompt,
                }
            )
        return out

    def prompt_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` prompts for online methods (score samples with :meth:`gold_reward`)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            prompt = self._prompt(rng)
            out.append({"prompt": prompt, "prompt_id": prompt})
        return out

    def optimal_response(self, prompt: str) -> str:
        """The response with gold reward 1."""
        c, n = self.parse_prompt(prompt)
        return c * n


# ========================================================================== arithmetic task
_ARITH_RE = re.compile(r"^(\d)\+(\d)x(\d+)=$")


@dataclasses.dataclass
class ArithmeticTask(_TaskDatasets):
    r"""Multi-step arithmetic with known per-step correctness (process supervision).

    The prompt ``"s+dxn="`` asks for ``n`` steps; step ``i`` (1-based) should be the digit
    :math:`v_i = (s + i\,d) \bmod 10`. A response is its steps, each followed by
    ``separator``. The base distribution (what step data is sampled from) writes ``n`` steps,
    each ``(previous + d) mod 10`` of the digit it wrote before with probability ``p_correct``
    and otherwise another digit, so one slip shifts every later step (locally consistent, globally
    wrong: a process reward model must look back past the last step to see it).

    Per-step gold labels follow the first-error rule: :math:`\ell_k = 1` iff steps ``1..k`` all
    equal :math:`v_1..v_k`; the minimum of the labels is then the outcome (the whole solution is
    right), the quantity a PRM's ``min`` aggregation estimates. The gold reward of a response is
    ``(steps correct before the first error) / max(n, number of steps)``, 1 only for the exact
    solution.

    Attributes:
      increments: the ``d`` that prompts use (default ``(1,)``, counting on by one: a tiny model
        learns to judge its steps in a few hundred steps; ``(1, 2, 3)`` takes several times
        longer).
      min_steps, max_steps: the range of ``n``.
      p_correct: per-step accuracy of the base distribution.
      separator: the text that ends every step (one token under the tokenizer).
      temperature, flip_prob: Bradley-Terry noise of the pairwise records.

    Example:
      >>> task = ArithmeticTask(increments=(1, 2, 3))
      >>> task.solution("3+2x4=")
      ['5', '7', '9', '1']
      >>> task.step_labels("3+2x4=", ["5", "8", "0", "2"])  # a slip at step 2, then consistent
      [1, 0, 0, 0]
      >>> task.gold_reward("3+2x4=", "5\n8\n0\n2\n")
      0.25
    """

    increments: tuple = (1,)
    min_steps: int = 2
    max_steps: int = 6
    p_correct: float = 0.8
    separator: str = "\n"
    temperature: float = 0.1
    flip_prob: float = 0.0
    default_max_len = 32

    def __post_init__(self):
        self.increments = tuple(int(d) for d in self.increments)
        if not self.increments or any(not 1 <= d <= 9 for d in self.increments):
            raise ValueError(f"increments must be digits 1..9, got {self.increments}")
        if not 1 <= self.min_steps <= self.max_steps <= 99:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps <= 99, got {self.min_steps}, {self.max_steps}"
            )
        if not 0.0 <= self.p_correct <= 1.0:
            raise ValueError(f"p_correct must be in [0, 1], got {self.p_correct}")
        if not self.separator or any(ch.isdigit() for ch in self.separator):
            raise ValueError(f"separator must be non-empty and digit-free, got {self.separator!r}")
        _check_noise(self.temperature, self.flip_prob)

    @property
    def prompts(self) -> list[str]:
        """All ``10 * len(increments) * (max_steps - min_steps + 1)`` prompts."""
        return [
            f"{s}+{d}x{n}="
            for s in range(10)
            for d in self.increments
            for n in range(self.min_steps, self.max_steps + 1)
        ]

    @staticmethod
    def parse_prompt(prompt: str) -> tuple[int, int, int]:
        """``"3+2x4="`` -> ``(3, 2, 4)``."""
        m = _ARITH_RE.match(prompt)
        if m is None:
            raise ValueError(f"not an ArithmeticTask prompt: {prompt!r}")
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    def solution(self, prompt: str) -> list[str]:
        """The correct steps ``[v_1, ..., v_n]`` as digit strings."""
        s, d, n = self.parse_prompt(prompt)
        return [str((s + i * d) % 10) for i in range(1, n + 1)]

    def step_labels(self, prompt: str, steps) -> list[int]:
        """First-error labels: 1 while every step so far equals the solution, then 0."""
        sol = self.solution(prompt)
        out, ok = [], True
        for i, step in enumerate(steps):
            ok = ok and i < len(sol) and step.strip() == sol[i]
            out.append(int(ok))
        return out

    def split_steps(self, response: str) -> list[str]:
        """The steps of a response text (split at the separator; a trailing empty part and
        everything after an empty step are dropped)."""
        parts = response.split(self.separator)
        out = []
        for part in parts:
            if not part.strip():
                break
            out.append(part)
        return out

    def join_steps(self, steps) -> str:
        """Response text of ``steps``: each followed by the separator."""
        return "".join(step + self.separator for step in steps)

    def gold_reward(self, prompt: str, response: str) -> float:
        """``(steps correct before the first error) / max(n, number of steps)``."""
        _, _, n = self.parse_prompt(prompt)
        steps = self.split_steps(response)
        return sum(self.step_labels(prompt, steps)) / max(n, len(steps))

    def sample_steps(self, rng, prompt: str) -> list[str]:
        """One response's steps from the base distribution."""
        s, d, n = self.parse_prompt(prompt)
        prev, out = s, []
        for _ in range(n):
            nxt = (prev + d) % 10
            if rng.random() >= self.p_correct:
                nxt = (nxt + int(rng.integers(1, 10))) % 10  # any other digit
            out.append(str(nxt))
            prev = nxt
        return out

    def _prompt(self, rng) -> str:
        s = int(rng.integers(10))
        d = self.increments[int(rng.integers(len(self.increments)))]
        return f"{s}+{d}x{int(rng.integers(self.min_steps, self.max_steps + 1))}="

    def step_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` base responses with their first-error step labels (``step`` kind) and the
        response's gold reward."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            prompt = self._prompt(rng)
            steps = self.sample_steps(rng, prompt)
            out.append(
                {
                    "prompt": prompt,
                    "steps": steps,
                    "labels": self.step_labels(prompt, steps),
                    "prompt_id": prompt,
                    "gold_reward": self.gold_reward(prompt, self.join_steps(steps)),
                }
            )
        return out

    def step_dataset(
        self, tokenizer, num, *, seed=0, max_len=None, max_prompt_len=None, **kw
    ) -> TokenizedDataset:
        """Tokenised :meth:`step_records` (the separator is this task's)."""
        kw.setdefault("step_separator", self.separator)
        return self._tok(
            "step",
            self.step_records(num, seed=seed),
            tokenizer,
            max_len or self.default_max_len,
            max_prompt_len,
            **kw,
        )

    def pairwise_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` pairs of distinct base responses labelled by Bradley-Terry under the gold
        reward (an outcome reward model's data for the same task)."""
        rng = np.random.default_rng(seed)
        out = []
        while len(out) < num:
            prompt = self._prompt(rng)
            a, b = (self.join_steps(self.sample_steps(rng, prompt)) for _ in range(2))
            if a == b:
                continue
            ra, rb = self.gold_reward(prompt, a), self.gold_reward(prompt, b)
            prob = preference_probability(
                ra, rb, temperature=self.temperature, flip_prob=self.flip_prob
            )
            if rng.random() >= prob:
                a, b, ra, rb = b, a, rb, ra
            out.append(
                {
                    "prompt": prompt,
                    "chosen": a,
                    "rejected": b,
                    "prompt_id": prompt,
                    "chosen_gold_reward": float(ra),
                    "rejected_gold_reward": float(rb),
                }
            )
        return out

    def sft_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` base-distribution responses as demonstrations."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            prompt = self._prompt(rng)
            text = self.join_steps(self.sample_steps(rng, prompt))
            out.append({"prompt": prompt, "completion": text, "prompt_id": prompt})
        return out

    def prompt_records(self, num: int, *, seed: int = 0) -> list[dict]:
        """``num`` prompts for sampling (best-of-N, online methods)."""
        rng = np.random.default_rng(seed)
        return [{"prompt": p, "prompt_id": p} for p in (self._prompt(rng) for _ in range(num))]

    def optimal_response(self, prompt: str) -> str:
        """The response with gold reward 1."""
        return self.join_steps(self.solution(prompt))


TASK_NAMES = ("bandit", "sequence", "arithmetic")


def make_task(name: str, **kw):
    """``"bandit"`` -> :meth:`Bandit.make`, ``"sequence"`` -> :class:`RepeatTask`,
    ``"arithmetic"`` -> :class:`ArithmeticTask` (kw passed on)."""
    if name == "bandit":
        return Bandit.make(**kw)
    if name == "sequence":
        return RepeatTask(**kw)
    if name == "arithmetic":
        return ArithmeticTask(**kw)
    raise ValueError(f"unknown built-in task {name!r} (expected one of {TASK_NAMES})")

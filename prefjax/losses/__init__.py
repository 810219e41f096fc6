"""prefjax.losses: pure, jit-safe objectives for preference alignment.

Every function takes arrays and returns unreduced per-example (or per-token) arrays; the caller
reduces. See each function's docstring for its formula, shapes and reference.
"""

# --- logprobs.py and preference.py ---
from prefjax.losses.logprobs import entropy, masked_mean, masked_sum, masked_var, masked_whiten
from prefjax.losses.logprobs import chunked_token_logprobs, sequence_logprobs, shift_labels
from prefjax.losses.logprobs import token_logprobs
from prefjax.losses.preference import KTOLossOutput, ListwiseLossOutput, PreferenceLossOutput
from prefjax.losses.preference import apo_down_loss, apo_zero_loss, bco_pair_loss, hinge_loss
from prefjax.losses.preference import bradley_terry_loss, plackett_luce_loss, sft_loss
from prefjax.losses.preference import cpo_loss, orpo_log_odds_ratio, orpo_loss, simpo_loss
from prefjax.losses.preference import dpo_loss, ipo_loss, robust_dpo_loss
from prefjax.losses.preference import exo_pair_loss, nca_pair_loss, sppo_hard_loss
from prefjax.losses.preference import kto_loss, kto_reference_point, listwise_dpo_loss
from prefjax.losses.preference import PAIRWISE_LOSSES
from prefjax.losses.preference import process_reward_loss

# --- advantages.py, kl.py and policy_gradient.py ---
from prefjax.losses.advantages import GAEOutput, discounted_returns, gae
from prefjax.losses.advantages import group_advantages, rloo_advantages
from prefjax.losses.kl import KL_ESTIMATORS, k1, k2, k3, kl_estimate
from prefjax.losses.kl import ShapedRewards, kl_shaped_rewards
from prefjax.losses.kl import AdaptiveKLState, adaptive_kl_init, adaptive_kl_update
from prefjax.losses.policy_gradient import PPOPolicyLossOutput, ppo_policy_loss
from prefjax.losses.policy_gradient import ValueLossOutput, value_loss, entropy_bonus
from prefjax.losses.policy_gradient import GRPOLossOutput, grpo_loss, reinforce_loss
from prefjax.losses.policy_gradient import LOSS_REDUCTIONS, constant_mean, sequence_mean
from prefjax.losses.policy_gradient import token_mean

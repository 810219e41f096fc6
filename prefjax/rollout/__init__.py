"""Online sampling on the training mesh and reward sources (see ``docs/online.md``)."""

from prefjax.rollout.sampler import FINISH_EOS as FINISH_EOS
from prefjax.rollout.sampler import FINISH_LENGTH as FINISH_LENGTH
from prefjax.rollout.sampler import FINISH_REASONS as FINISH_REASONS
from prefjax.rollout.sampler import FINISH_STOP as FINISH_STOP
from prefjax.rollout.sampler import Rollout as Rollout
from prefjax.rollout.sampler import SamplingConfig as SamplingConfig
from prefjax.rollout.sampler import make_sampler as make_sampler
from prefjax.rollout.sampler import sample as sample
from prefjax.rollout.sampler import sequences as sequences
from prefjax.rollout.sampler import stop_sequences_from_strings as stop_sequences_from_strings
from prefjax.rollout.sampler import token_logprobs as token_logprobs
from prefjax.rollout.sampler import transform_logits as transform_logits
from prefjax.rollout.rewards import BestOfN as BestOfN
from prefjax.rollout.rewards import GoldReward as GoldReward
from prefjax.rollout.rewards import RewardModel as RewardModel
from prefjax.rollout.rewards import RewardSource as RewardSource
from prefjax.rollout.rewards import RewardTransform as RewardTransform
from prefjax.rollout.rewards import Scores as Scores
from prefjax.rollout.rewards import Verifier as Verifier
from prefjax.rollout.rewards import best_of_n as best_of_n
from prefjax.rollout.rewards import on_last_token as on_last_token
from prefjax.rollout.rewards import sample_best_of_n as sample_best_of_n
from prefjax.rollout.rewards import score as score
from prefjax.rollout.rewards import transform_scores as transform_scores

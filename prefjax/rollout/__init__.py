"""Online sampling and reward sources.

``prefjax.rollout.prm``: process reward models -- step scores of token arrays
(:func:`~prefjax.rollout.prm.step_scores`) and their ``min`` / ``product`` aggregation.
"""

from prefjax.rollout.prm import AGGREGATIONS as AGGREGATIONS
from prefjax.rollout.prm import StepScores as StepScores
from prefjax.rollout.prm import aggregate_step_scores as aggregate_step_scores
from prefjax.rollout.prm import prm_rewards as prm_rewards
from prefjax.rollout.prm import separator_mask as separator_mask
from prefjax.rollout.prm import step_logits as step_logits
from prefjax.rollout.prm import step_scores as step_scores

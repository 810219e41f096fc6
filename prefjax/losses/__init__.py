"""prefjax.losses: pure, jit-safe objectives for preference alignment.

Every function takes arrays and returns unreduced per-example (or per-token) arrays; the caller
reduces. See each function's docstring for its formula, shapes and reference.
"""

# --- logprobs.py and preference.py ---
from prefjax.losses.logprobs import entropy, masked_mean, masked_sum, masked_var, masked_whiten
from prefjax.losses.logprobs import chunked_token_logprobs, sequence_logprobs, shift_labels
from prefjax.losses.logprobs import token_logprobs

# --- advantages.py, kl.py and policy_gradient.py ---

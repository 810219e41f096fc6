"""prefjax.losses: pure, jit-safe objectives for preference alignment.

Every function takes arrays and returns unreduced per-example (or per-token) arrays; the caller
reduces. See each function's docstring for its formula, shapes and reference.
"""

# --- logprobs.py and preference.py ---

# --- advantages.py, kl.py and policy_gradient.py ---

"""prefjax: aligning language models with human preferences in JAX/Flax.

Subpackages:
  prefjax.losses   pure, jit-safe loss functions (import these into any training loop)
  prefjax.models   Flax decoder-only transformers, KV cache, heads, LoRA, HF checkpoints
  prefjax.data     preference/feedback/prompt data: schemas, readers, validation, batching, tasks
  prefjax.train    sharded, jitted train steps and the training loop
"""

__version__ = "0.1.0"

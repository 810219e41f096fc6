"""Sharded, jitted train steps and the training loop.

One file per algorithm, each with the same shape (``make_train_step``, ``make_eval_step``,
``setup``, ``run``):

  prefjax.train.sft         supervised fine-tuning (token-mean NLL of responses)
  prefjax.train.reward      reward models: Bradley-Terry (with margin), Plackett-Luce
  prefjax.train.dpo         DPO and its family (every ``prefjax.losses.PAIRWISE_LOSSES`` entry,
                            listwise, KTO, ORPO, SimPO); precomputed reference log-probs
  prefjax.train.evaluation  held-out metrics, bandit KL to the closed-form optimum, gold reward
                            of generated responses, KL to the reference, length statistics
  prefjax.train.state       ``TrainState`` (step, trainable params, optimiser state)
  prefjax.train.optim       AdamW + schedules, exact gradient accumulation, non-finite guard
  prefjax.train.common      shared pieces (log-probs of a batch, ``Setup``, jitting)
  prefjax.train.loop        the loop (checkpoints, resumption, metrics, plots)

See ``docs/training.md``.
"""

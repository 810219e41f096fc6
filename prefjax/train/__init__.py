"""Sharded, jitted train steps and the training loop.

One file per algorithm, each filling the same protocol:

  prefjax.train.sft         supervised fine-tuning (token-mean NLL of responses)
  prefjax.train.reward      reward models: Bradley-Terry (with margin), Plackett-Luce
  prefjax.train.dpo         DPO and its family (every ``prefjax.losses.PAIRWISE_LOSSES`` entry,
                            listwise, KTO, ORPO, SimPO)
  prefjax.train.grpo        GRPO / RLOO / REINFORCE on sampled groups (grpo, dr_grpo, dapo,
                            bnpo reductions; KL in the loss or the reward; GSPO ratio)
  prefjax.train.online_dpo  online DPO: pairs (or rankings) of the policy's own samples ranked
                            by a reward source, DPO's loss and step
  prefjax.train.ppo         PPO with GAE: KL-shaped rewards, a value head or separate critic,
                            epochs x minibatches of clipped updates in one jitted function

and the pieces they share:

  prefjax.train.config      shared config fields: validation (once per run), derived values
  prefjax.train.setup       sharded state, frozen pytree, jitted steps (``build_setup``)
  prefjax.train.reference   reference log-probs precomputed once (``reference="precomputed"``)
  prefjax.train.online      the online algorithms' prompt batch -> rollout -> score pipeline
                            (``"prompt"`` batches, a ``setup`` whose step samples, scores and
                            updates) and reward sources from the config
  prefjax.train.loop        the loop (checkpoints, resumption, metrics, plots); no algorithm names
  prefjax.train.workdir     run directories: identity, resume rules, lock
  prefjax.train.evaluation  held-out metrics, bandit KL to the closed-form optimum, gold reward
                            of generated responses, KL to the reference, length statistics
  prefjax.train.state       ``TrainState`` (step, trainable params, optimiser state)
  prefjax.train.optim       AdamW + schedules, exact gradient accumulation, non-finite guard
  prefjax.train.common      log-probs of a batch, ``Setup``, jitting, the update with its norms
  prefjax.train.sweep       K DPO members (beta, label smoothing, learning rate, seed) in one
                            compiled step against one reference: one workdir per member

The ``Algorithm`` protocol
--------------------------
An algorithm is a module (or any object) with these attributes; :func:`prefjax.train.loop.run`
asks it for everything it needs and knows no algorithm by name:

==========================================  ====================================================
``NAME``                                    the ``config.algorithm.name`` it trains
``HEAD``                                    the model head: ``"lm"`` (a policy) or ``"reward"``
``default_config() -> ConfigDict``          its ``config.algorithm`` block: ``name``, ``loss``
                                            and its own hyperparameters, each with a comment;
                                            defined here, once (an SFT config has no beta)
``batch_kind(config) -> str``               the batches it reads: ``"sft"``, ``"pairwise"``
                                            (``[batch, 2, seq]``), ``"listwise"`` (``[batch,
                                            K, seq]``), ``"unpaired"`` or ``"prompt"`` (online
                                            algorithms; prefjax.data kinds)
``reference(config) -> str``                ``"none"``, ``"copy"`` (a frozen copy of the
                                            initial policy), ``"lora_base"`` (adapters off) or
                                            ``"precomputed"`` (log-probs computed once, beside
                                            the data)
``validate_config(config)``                 its own fields' start-up checks (run once per run);
                                            raise ``ValueError`` naming ``config.<field>`` (the
                                            shared fields are checked by
                                            :mod:`prefjax.train.config`)
``objective(model, config) -> Objective``   :class:`prefjax.train.common.Objective`: the loss
                                            on one micro-batch with its ``{name: (sum,
                                            count)}`` stats, the full batch's denominators, the
                                            one metric finalisation train and eval share, and
                                            the KL coefficient of the objective (or ``None``)
``setup(config, model, mesh, key)``         optional: its own :class:`~prefjax.train.common.
                                            Setup` (extra frozen trees, a wrapped step); without
                                            it :func:`prefjax.train.setup.build_setup` builds
                                            the sharded state, frozen tree and jitted steps
==========================================  ====================================================

Adding an algorithm is one file here plus a config and a launcher in ``experiments/`` (and an
entry in ``experiments/configs/common.py``'s ``ALGORITHM_MODULES``); the loop, the inputs and
the evaluation do not change. ``tests/train/test_algorithm_protocol.py`` trains a reference-free
SLiC-HF calibration loss written in ~40 lines through the unchanged loop; docs/training.md,
"Adding an algorithm", walks through it.

See ``docs/training.md``.
"""

"""The trainer: contrastive tuning of the text tower (and any unlocked image tower) against the image tower.

In: a :class:`~littune.config.TrainConfig`, a :class:`~littune.model.LiTModel`, and training pairs -- image
features read from the embedding cache (:mod:`littune.cache`) for a locked tower, or images decoded on the fly
(:mod:`littune.data`) for one that trains. Out: a run folder (checkpoints, ``train.jsonl``, ``val.jsonl``,
``results.json``) and the trained model written to ``RUN/model``.

* :mod:`~littune.train.trainer` -- the loop; :mod:`~littune.train.run_plan` -- sizing the run from the data;
  :mod:`~littune.train.rundir` -- the run folder and its lock; :mod:`~littune.train.run_outcome` -- what a
  finished run reports.
* :mod:`~littune.train.batches` -- batches from the cache or from images; :mod:`~littune.train.sampling` --
  which caption (language) each image gets.
* :mod:`~littune.train.losses`, :mod:`~littune.train.chunked_loss`, :mod:`~littune.train.accumulate` -- the
  contrastive losses, in memory-bounded chunks, over accumulated micro-batches.
* :mod:`~littune.train.optim` -- optimiser, schedule, lr multipliers and delayed unlocking;
  :mod:`~littune.train.checkpoint` -- saving and resuming; :mod:`~littune.train.distributed` -- several
  processes; :mod:`~littune.train.monitor` -- logging and the resume check; :mod:`~littune.train.validation`
  -- the ``val`` section's zero-shot and retrieval scores during training.
"""

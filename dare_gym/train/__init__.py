"""The training loop and what a run writes: ``trainer`` (``Trainer``, ``TrainConfig``), ``evaluation``,
``checkpoints``, ``metrics``, the console (``console``) and user modules named in a config (``user_code``)."""

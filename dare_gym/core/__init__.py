"""The core of a training step: the policy and its loading (``policy``, ``loading``, ``lora``), what rollouts
become (``buffer``), how a dLLM's likelihood is estimated (``estimators``, ``logprobs``), the losses and advantages
two or more algorithms share (``losses``, ``advantages``), and the machinery under them (``device``,
``distributed``, ``precision``, ``config``, ``registry``, ``sft``). Algorithms build on it; it imports none of them.
"""

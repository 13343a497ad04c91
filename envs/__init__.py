"""Text task environments. Each module is one task family; registration happens here."""

from dare_gym.envs.base import TextTaskEnv
from dare_gym.registry import register_env

register_env("digitsort-v0", "dare_gym.envs.sorting:DigitSortEnv")
register_env("gsm8k-v0", "dare_gym.envs.gsm8k:GSM8KEnv")

DEFAULT_ENV = "digitsort-v0"

__all__ = ["DEFAULT_ENV", "TextTaskEnv"]

"""Text task environments. Each module is one task family; registration happens here."""

from dare_gym.envs.base import TextTaskEnv
from dare_gym.registry import register_env

register_env("digitsort-v0", "dare_gym.envs.sorting:DigitSortEnv")
register_env("groupsort-v0", "dare_gym.envs.groupsort:GroupSortEnv")
register_env("gsm8k-v0", "dare_gym.envs.gsm8k:GSM8KEnv")
register_env("math500-v0", "dare_gym.envs.math:Math500Env")
register_env("math-v0", "dare_gym.envs.math:MathEnv")
register_env("countdown-v0", "dare_gym.envs.countdown:CountdownEnv")
register_env("sudoku4-v0", "dare_gym.envs.sudoku:Sudoku4Env")
register_env("humaneval-v0", "dare_gym.envs.code:HumanEvalEnv")
register_env("mbpp-v0", "dare_gym.envs.code:MBPPEnv")

DEFAULT_ENV = "digitsort-v0"

__all__ = ["DEFAULT_ENV", "TextTaskEnv"]

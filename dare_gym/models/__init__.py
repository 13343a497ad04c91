"""Model families and the models this project implements or adapts (importing this registers them)."""

from dare_gym.models import llada, llada2, qwen_dllms, tiny  # noqa: F401  (register their classes with the Auto classes)
from dare_gym.models.families import FAMILIES, ModelFamily, family_for_model_type, get_family, register_family
from dare_gym.models import diffusion_gemma  # noqa: F401,E402  (registers the diffusion_gemma family, after the four)

__all__ = ["FAMILIES", "ModelFamily", "family_for_model_type", "get_family", "register_family"]

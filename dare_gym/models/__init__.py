"""Model families and the built-in tiny model."""

from dare_gym.models.families import FAMILIES, ModelFamily, get_family, register_family

__all__ = ["FAMILIES", "ModelFamily", "get_family", "register_family"]

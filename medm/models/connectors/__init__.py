"""Connectors, one file each; importing this package registers them."""

from medm.models.connectors import attention_pool, mlp, spatial_pool  # noqa: F401
from medm.models.connectors._base import Connector
from medm.models.connectors._mlp import build_mlp, parse_mlp_type

__all__ = ["Connector", "build_mlp", "parse_mlp_type"]

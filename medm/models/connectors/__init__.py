"""Connectors, one file each: `medm.registry` imports every public module of this folder at first lookup."""

from medm.models.connectors._base import Connector
from medm.models.connectors._mlp import build_mlp, parse_mlp_type

__all__ = ["Connector", "build_mlp", "parse_mlp_type"]

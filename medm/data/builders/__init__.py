"""Data builders, one source per file (`medm data build NAME`): `medm.registry` imports every public module of this
folder at first lookup."""

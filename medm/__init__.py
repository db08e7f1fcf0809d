"""medm: build, train, evaluate and demo small medical vision-language models."""

__version__ = "0.1.0"

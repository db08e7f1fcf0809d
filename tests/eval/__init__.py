"""Evaluation tests (a package, so test_cli.py here and tests/data/test_cli.py can share a basename)."""

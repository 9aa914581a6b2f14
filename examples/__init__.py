"""Bundled example models built in code (no downloads): `nasc.examples.build(name)`."""

from nasc.examples.zoo import DEFAULT_EXAMPLE, EXAMPLES, build

__all__ = ["DEFAULT_EXAMPLE", "EXAMPLES", "build"]

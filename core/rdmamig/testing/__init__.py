"""Test helpers shipped with rdmamig, for its own tests and for plugin authors.

- :mod:`rdmamig.testing.conformance`: the backend conformance suite.
"""

from .pairs import connected_pair

__all__ = ["connected_pair"]

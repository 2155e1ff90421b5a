"""Stand-in for transformers' `tests/generation/test_utils.py`, which the transformers sdist does not ship.

Installed by `fetch.py` as `generation/test_utils.py` next to the sdist's `test_modeling_common.py`, which imports
`GenerationTesterMixin` from it for one purpose: `test_generation_tester_mixin_inheritance` checks that the test class
of a model able to `generate` inherits it (and that one unable to does not).

The real mixin holds transformers' generate tests. They are not in the sdist, so this class holds none and pretends
to run none: AGILLM's generation (greedy/sampling/beam, caches, compile) is tested by this repository's own test files.
"""


class GenerationTesterMixin:
    """Marks a `ModelTesterMixin` test class whose models can `generate`. Adds no tests (see the module docstring)."""

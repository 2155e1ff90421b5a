"""Stand-in for transformers' `tests/exporters/test_export.py`, which the transformers sdist does not ship.

Installed by `fetch.py` as `exporters/test_export.py`: the sdist's `ModelTesterMixin` subclasses `ExportTesterMixin`.
The real mixin holds the export tests (torch.export / ONNX / ExecuTorch / OpenVINO round trips); they are not in the
sdist, so this base class holds none and pretends to run none.
"""


class ExportTesterMixin:
    """Base class of `ModelTesterMixin`. Adds no tests (see the module docstring)."""

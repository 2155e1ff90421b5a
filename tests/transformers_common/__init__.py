"""Run transformers' own common model tests (`ModelTesterMixin`) against AGILLM.

`fetch.py` obtains the test files from the source distribution of the installed transformers; the two `standin_*.py`
files replace the modules that `test_modeling_common.py` imports but the sdist does not ship.
"""

"""Offline corpora that ship inside registry packages (nothing is downloaded at run time)."""

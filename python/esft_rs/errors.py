"""The esft-rs exception hierarchy, defined in the Rust core and shared with Python code.

- ``EsftError``: base of everything esft-rs raises on bad input.
- ``InvalidFileError``: a file is malformed or says something impossible.
- ``MismatchError``: inputs that are each valid do not fit together.

I/O failures are the built-in ``OSError`` subclasses (``FileNotFoundError``, ...).
"""

from esft_rs._core import EsftError, InvalidFileError, MismatchError

__all__ = ["EsftError", "InvalidFileError", "MismatchError"]

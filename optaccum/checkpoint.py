"""Checkpoints that resume mid-window exactly, with Orbax (`pip install optaccum[checkpoint]`).

Importing this module does not import Orbax; each function does when called.
"""

from optaccum._checkpoint import checkpoint_metadata as metadata
from optaccum._checkpoint import restore_checkpoint as restore
from optaccum._checkpoint import save_checkpoint as save

__all__ = ["metadata", "restore", "save"]

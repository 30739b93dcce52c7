"""The torch backend's build step: the 'engine' is this package's checkpoint format (spec +
state_dict), written from the model the build exported.

A build step (tests/test_layout.py puts every backends.<name>.compiler module in the build room):
imported only by the backend's thin compile() when an engine is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...nn.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from ...build.builder import BuildJob


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Write the torch 'engine': this package's checkpoint format (spec + state_dict)."""
    job.say("[2/2] saving the PyTorch model (served by torch; fp16 runs on CUDA)")
    save_checkpoint(job.model, built)
    return {}

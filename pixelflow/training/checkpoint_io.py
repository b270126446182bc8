"""Lightning's checkpoint files (periodic, ``last.ckpt``, SLURM's ``hpc_ckpt_*``) through :mod:`pixelflow.atomic`.

Lightning's own writer renames a finished temporary too, but without fsync, so a machine that loses power
can keep a renamed file whose data never reached the disk; and a full disk surfaces as a bare OSError. Here
every checkpoint is fsynced before the rename and the directory after it, its temporary is a hidden
``.partial`` name that no ``*.ckpt`` glob (retention, resume) matches, and a full disk stops the run with
a message naming the file, with the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pixelflow.atomic import atomic_torch_save

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose saves are :func:`~pixelflow.atomic.atomic_torch_save` (loading unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by AtomicCheckpointIO (local checkpoint files only)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)

"""Unreadable images never crash a run: decode strictly, skip, count across worker processes, report.

:func:`open_rgb` decodes an image completely (a truncated JPEG fails here, not later in a
transform). Datasets call :meth:`SkipLedger.record` when it fails and move on (folder datasets through
:class:`SkippingFiles`); the ledger's counters live in shared memory, so DataLoader worker processes
report to the main process. :class:`SkipReporting` (a datamodule mixin) prints the count after every
pass over the data and a summary at the end of training; :class:`FolderSkipReporting` also names the files.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

__all__ = ["UNREADABLE_ERRORS", "MAX_CONSECUTIVE_UNREADABLE", "open_rgb", "SkipLedger", "SkippingFiles", "SkipReporting",
           "FolderSkipReporting"]

logger = logging.getLogger(__name__)

# What PIL and the tar reader raise for broken inputs (UnidentifiedImageError is an OSError).
UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Stop after this many unreadable files in a row: the folder itself is broken, not a few files.
MAX_CONSECUTIVE_UNREADABLE = 64


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Fully decode an image file or encoded bytes to RGB; raises one of :data:`UNREADABLE_ERRORS`."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return image.convert("RGB")


class SkipLedger:
    """Counts skipped samples in shared memory: one counter per DataLoader worker (no races), plus
    one flag per dataset index when the dataset is indexable (to name the distinct bad files)."""

    def __init__(self, num_items: int = 0, max_workers: int = 256):
        self.max_workers = max_workers
        self._counts = torch.zeros(max_workers + 1, dtype=torch.int64).share_memory_()
        self._flags = torch.zeros(num_items, dtype=torch.bool).share_memory_()

    def record(self, what: str, error: BaseException, index: int | None = None) -> None:
        """Count one skipped sample (called in whichever process read it) and log why."""
        info = get_worker_info()
        self._counts[0 if info is None else 1 + info.id % self.max_workers] += 1
        if index is not None and index < len(self._flags):
            self._flags[index] = True
        logger.warning("skipping unreadable data: %s (%s: %s)", what, type(error).__name__, error)

    @property
    def total(self) -> int:
        """Skip events so far, over all workers (a bad file met twice counts twice)."""
        return int(self._counts.sum())

    def bad_indices(self) -> list[int]:
        """Distinct dataset indices found unreadable so far."""
        return self._flags.nonzero().flatten().tolist()


class SkippingFiles(Dataset):
    """Image files read by index; an unreadable one is recorded in ``ledger`` and the next index is read instead.

    Subclasses set ``ledger`` and give :meth:`image_path`, :meth:`item` (the sample made from the decoded image)
    and :attr:`broken_hint` (what to check when :data:`MAX_CONSECUTIVE_UNREADABLE` fail in a row).
    """

    ledger: SkipLedger

    def image_path(self, index: int) -> str | Path:
        raise NotImplementedError

    def item(self, index: int, image: Image.Image) -> Any:
        raise NotImplementedError

    @property
    def broken_hint(self) -> str:
        return "are the files images?"

    def __getitem__(self, index: int) -> Any:
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):
            i = (index + offset) % len(self)
            path = self.image_path(i)
            try:
                image = open_rgb(path)
            except UNREADABLE_ERRORS as err:
                self.ledger.record(str(path), err, index=i)
                continue
            return self.item(i, image)
        raise RuntimeError(f"{MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row from {self.image_path(index)}: "
                           f"{self.broken_hint}")


class SkipReporting:
    """Datamodule mixin: prints skipped-image counts after each pass over the data and a summary.

    The host sets ``self.skips`` (a :class:`SkipLedger`) and implements ``samples_per_pass()``
    and ``describe_skips()``. Counts are per rank; every rank prints its own lines.
    """

    skips: SkipLedger | None = None
    _batches_seen = 0
    _reported = 0

    def samples_per_pass(self) -> int:
        raise NotImplementedError

    def describe_skips(self) -> str:
        """Extra detail for the summary line (e.g. the first bad file names)."""
        return ""

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Count this rank's batches; at each completed pass over the data, report new skips."""
        if self.trainer is not None and self.trainer.training:
            self._batches_seen += 1
            consumed = getattr(self, "_start", 0) + self._batches_seen * self.batch_size  # this rank, since step 0
            world, per_pass = max(self.trainer.world_size, 1), max(self.samples_per_pass(), 1)
            finished = consumed * world // per_pass
            if finished > (consumed - self.batch_size) * world // per_pass:
                self.report_skips(f"data pass {finished} done")
        return batch

    def report_skips(self, when: str) -> int:
        """Log (and record in the trainer's loggers) how many images were skipped; return the total."""
        total = self.skips.total if self.skips is not None else 0
        new, self._reported = total - self._reported, total
        rank = self.trainer.global_rank if self.trainer is not None else 0
        logger.log(logging.WARNING if new else logging.INFO, "%s: %d unreadable image(s) skipped since the last report, "
                   "%d in total (rank %d)", when, new, total, rank)
        if self.trainer is not None:
            for experiment_logger in self.trainer.loggers:
                experiment_logger.log_metrics({"data/skipped_images": total}, step=self.trainer.global_step)
        return total

    def teardown(self, stage: str) -> None:
        """End of fit: one summary line per rank."""
        if stage == "fit" and self.skips is not None:
            self.report_skips("training finished")
            detail = self.describe_skips()
            if detail:
                logger.warning("unreadable images: %s", detail)


class FolderSkipReporting(SkipReporting):
    """:class:`SkipReporting` for a datamodule that trains on the :class:`SkippingFiles` of :meth:`train_files`;
    its summary names the first unreadable files."""

    def train_files(self) -> SkippingFiles:
        raise NotImplementedError

    def build_train_dataset(self) -> SkippingFiles:
        dataset = self.train_files()
        self.skips = dataset.ledger
        return dataset

    def samples_per_pass(self) -> int:
        return len(self._train) if self._train is not None else 0

    def describe_skips(self) -> str:
        bad = self.skips.bad_indices()
        if not bad:
            return ""
        names = [str(self._train.image_path(i)) for i in bad[:10]]
        return f"{len(bad)} distinct unreadable image(s): " + ", ".join(names) + (" ..." if len(bad) > 10 else "")

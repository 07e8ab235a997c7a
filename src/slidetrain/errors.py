"""One exception hierarchy for the whole package.

Every message names the slide, file or config key, the bad value and what was
expected, so a user reading a Snakemake log knows what to fix.
"""

from __future__ import annotations


class SlidetrainError(Exception):
    """Base of every error slidetrain raises on purpose."""


class ConfigError(SlidetrainError):
    """A config key is missing, unknown or has a bad value."""


class SheetError(SlidetrainError):
    """A slide sheet is malformed (missing file, unknown label, duplicate id, ...)."""


class SlideError(SlidetrainError):
    """A slide cannot be read or lacks what a step needs (MPP, levels, ...)."""

    def __init__(self, slide: str, message: str):
        self.slide = str(slide)
        super().__init__(f"slide {self.slide}: {message}")


class NoTissueError(SlideError):
    """Masking found no tissue (or too little to tile) on a slide."""


class SplitError(SlidetrainError):
    """A split is inconsistent (patient in two parts, class missing, ...)."""


class TrainingError(SlidetrainError):
    """Training diverged (non-finite loss or predictions)."""


class DistributedError(SlidetrainError):
    """A distributed collective failed or timed out; the message names the ranks that stopped answering."""


class ShardError(SlidetrainError):
    """A slide failed inside a shard job (the slides finished before it are kept)."""

    def __init__(self, shard: str, slide: str, message: str):
        self.shard, self.slide = str(shard), str(slide)
        super().__init__(f"shard {self.shard}: slide {self.slide}: {message}")


class DownloadError(SlidetrainError):
    """A slide or sheet could not be fetched or verified (HTTP error, md5 mismatch, credentials)."""

    def __init__(self, what: str, message: str):
        self.what = str(what)
        super().__init__(f"{self.what}: {message}")


class WeightsError(ConfigError):
    """An encoder's weights file is missing, fails its sha256 or does not fit the architecture; the message
    names the model, the file and where its model card says to get it."""

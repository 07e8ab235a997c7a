"""slidetrain: train whole-slide image classifiers from raw slides to the papers' tables."""

__version__ = "0.1.0"

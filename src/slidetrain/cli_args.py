"""Argument types and small helpers that the packages' `commands` modules share."""

from __future__ import annotations

import argparse
import json


def json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r}: {err}") from err


def torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)

"""The model card (README.md) a compressed checkpoint folder carries: what it is, how it was
compressed and calibrated, and how to load it.

A folder's README.md is the user's: it is written only where none exists, or where the one there is
a card blastfx wrote and nobody edited since (its last line holds the sha256 of the text above it),
so that saving again refreshes a stale card but never touches one a person wrote or changed. The
card appears whole or not at all (written beside, then linked into place).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

from .._version import __version__
from ..plan import Plan

CARD_NAME = "README.md"
TMP_PREFIX = ".blastfx-card-"
_STAMP = re.compile(r"\n<!-- blastfx model card; sha256 of the text above: ([0-9a-f]{64}) -->\n\Z")

_OBJECTIVES = {
    "weight": "no calibration data: each weight matrix was factorized on its own (weight error)",
    "output": "calibrated: each layer's factorization minimizes its output error on the calibration inputs",
    "loss": "calibrated, loss-aware: each layer's output error is weighted by the loss Fisher of its outputs "
            "on the calibration batches",
}


def _stamp(text: str) -> str:
    return f"{text}\n<!-- blastfx model card; sha256 of the text above: {hashlib.sha256(text.encode()).hexdigest()} -->\n"


def is_unedited_card(text: str) -> bool:
    """Whether ``text`` is a card blastfx wrote, unchanged since."""
    match = _STAMP.search(text)
    return bool(match) and hashlib.sha256(text[:match.start()].encode()).hexdigest() == match.group(1)


def model_card(plan: Plan, *, title: str, load_code: str, total_params: int | None = None,
               blast_params: int | None = None) -> str:
    """The card's text (YAML front matter, then Markdown)."""
    counts = [f"| layers compressed (BLAST) | {len(plan.layers)} |",
              f"| layers the allocation kept dense | {len(plan.dense)} |",
              f"| compressible parameters kept | {plan.kept_params:,} of {plan.dense_total:,} "
              f"({plan.kept_fraction:.4f}) |",
              f"| budget asked | {plan.budget:g} |",
              f"| strategy | {plan.strategy} |"]
    if total_params is not None:
        counts.append(f"| parameters of the whole model | {total_params:,}"
                      + (f", of which BLAST factors {blast_params:,}" if blast_params is not None else "") + " |")
    counts.append(f"| blastfx version | {__version__} |")
    objective = _OBJECTIVES.get(plan.objective, f"objective {plan.objective!r}") if plan.objective else (
        "not fitted to trained weights (init='random', for training from scratch), or not recorded on the plan")
    lines = ["---", "library_name: blastfx", "tags:", "- blastfx", "- blast", "- compressed", "---", "",
             f"# {title}", "",
             "Compressed with blastfx: dense linear layers replaced by BLAST matrices (Block-Level Adaptive",
             "STructured matrices, Lee et al., NeurIPS 2024), each stored as factors U, S, V in place of its weight.",
             "", "## Compression", "", "| | |", "|---|---|", *counts, "", "```", plan.summary(), "```", "",
             "## Calibration", "", f"{objective[0].upper()}{objective[1:]}."]
    if plan.notes:
        lines += ["", "Notes recorded on the plan:", "", *(f"- {note}" for note in plan.notes)]
    lines += ["", "## Load", "", "```python", load_code.strip(), "```", ""]
    text = "\n".join(lines)
    return _stamp(text)


def write_model_card(folder, text: str) -> Path | None:
    """Write ``text`` (from :func:`model_card`) as ``folder/README.md`` unless a README.md is there that
    blastfx did not write or that was edited since. Returns the path written, or None."""
    folder = Path(folder)
    target = folder / CARD_NAME
    for stale in folder.glob(f"{TMP_PREFIX}*.tmp"):      # left by an interrupted earlier write
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    if target.exists():
        try:
            mine = is_unedited_card(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            mine = False
        if not mine:
            return None
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=folder)
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if target.exists():
            os.replace(tmp, target)            # our own unedited card: refresh it
        else:
            try:
                os.link(tmp, target)           # atomic, and never replaces a file that appeared meanwhile
            except FileExistsError:
                return None
            except OSError:                    # a file system without hard links
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            os.unlink(tmp)
    return target

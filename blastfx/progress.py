"""Progress bars for the long passes (calibration, factorization), through tqdm.

``enabled=False`` (``BlastConfig(progress=False)``) turns a bar off. Otherwise tqdm's own defaults
apply, so its environment settings work too (``TQDM_DISABLE=1`` turns every bar off): ``disable`` is
never passed as False, which would override them.
"""
from __future__ import annotations


def progress_bar(iterable=None, *, enabled: bool, desc: str, total: int | None = None, unit: str = "batch",
                 leave: bool = True):
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps), described by ``desc``."""
    from tqdm.auto import tqdm

    options = {} if enabled else {"disable": True}
    return tqdm(iterable, desc=f"blastfx: {desc}", total=total, unit=unit, leave=leave, **options)

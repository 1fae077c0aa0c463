"""Progress bars for long work: drawn on a terminal, silent in CI logs and in Dagster's captured output."""
from __future__ import annotations

import os

from tqdm import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that draws only when stderr is a terminal (disable=None); TQDM_DISABLE=1 silences it anywhere.

    tqdm reads TQDM_DISABLE only as a default, which an explicit `disable` overrides, hence the check here.
    """
    flag = os.environ.get("TQDM_DISABLE", "").strip().lower()
    kwargs.setdefault("disable", None if flag in ("", "0", "false", "no", "off") else True)
    return tqdm(iterable, **kwargs)

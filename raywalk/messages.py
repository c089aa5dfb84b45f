"""The one way raywalk tells the user something: a line on stderr, flushed at once.

Every `log=` parameter defaults to `tell`; callers that collect lines (tests, Tune trials)
pass their own function of the same shape (`Tell`).
"""
from __future__ import annotations

import sys
from typing import Callable

Tell = Callable[[str], None]


def tell(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet(msg: str) -> None:
    """A Tell that says nothing (ranks other than 0)."""

"""Warnings that point at the user's line: the first stack frame outside the lmmarg package."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

__all__ = ["warn_user"]


def _user_stacklevel() -> int:
    """stacklevel for warnings.warn called from warn_user: frames inside lmmarg are skipped."""
    level, frame = 1, sys._getframe(2)  # the caller of warn_user is level 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame = frame.f_back
        level += 1
    return level


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category) attributed to the first caller outside lmmarg."""
    warnings.warn(message, category, stacklevel=_user_stacklevel() + 1)

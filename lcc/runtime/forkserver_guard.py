"""Imported by the fork server that `lcc run train` starts (one of its preload modules): the server then
ends when the launcher does, and with it every rank it forked (each dies with its parent). Imported
anywhere else, it does nothing."""

from __future__ import annotations

import os

from lcc.runtime.parent_death import LAUNCHER_ENV, die_with_parent

_launcher = os.environ.get(LAUNCHER_ENV, "")
if _launcher.isdigit() and int(_launcher) == os.getppid():
    die_with_parent(int(_launcher))

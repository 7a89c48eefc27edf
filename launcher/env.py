"""Test hooks: environment variables that only the test-suite sets, read here and nowhere else.

They let a test land a kill at a chosen moment (a slow step, a checkpoint write paused before it is
sealed), see what each DeepSpeed optimizer step spanned, or inject a CUDA out-of-memory error. A user
never needs them; each does nothing unless set.
"""
from __future__ import annotations

import os

STEP_DELAY = "QHM_TEST_STEP_DELAY"                # seconds to sleep after every optimizer step
PAUSE_BEFORE_SEAL = "QHM_TEST_PAUSE_BEFORE_SEAL"  # seconds to pause before a checkpoint is sealed...
PAUSE_FROM_STEP = "QHM_TEST_PAUSE_FROM_STEP"      # ...for checkpoints at or after this global step
STEP_LOG = "QHM_TEST_STEP_LOG"                    # file: one JSON line per DeepSpeed optimizer step
OOM_AT = "QHM_TEST_OOM_AT"                        # "epoch:step[:micro]": raise an out-of-memory error there once
OOM_ABOVE = "QHM_TEST_OOM_ABOVE"                  # micro-batch size above which the memory probe "fails"


def _float(name: str) -> float:
    return float(os.environ.get(name) or 0)


def step_delay() -> float:
    return _float(STEP_DELAY)


def pause_before_seal(step: int) -> float:
    """Seconds to pause before sealing checkpoint ``step`` (0: no pause)."""
    pause = _float(PAUSE_BEFORE_SEAL)
    return pause if pause and step >= int(_float(PAUSE_FROM_STEP)) else 0.0


def step_log() -> str | None:
    return os.environ.get(STEP_LOG) or None


def oom_at() -> tuple[int, ...] | None:
    text = os.environ.get(OOM_AT)
    return tuple(int(x) for x in text.split(":")) if text else None


def oom_above() -> int | None:
    text = os.environ.get(OOM_ABOVE)
    return int(text) if text else None

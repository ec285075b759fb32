"""How much prompt the engine reads per step (chunked prefill), from how long steps take here.

A fixed token budget cannot fit every machine: on a GPU 512 tokens take about one decode step, on
two CPU cores 32 tokens of a mid-size model take about two, and the same 32 tokens of a full-size
one take two seconds. So by default the budget is paced by time (a `--prefill-chunk` given
explicitly is kept fixed). The device's floor (engine.default_prefill_chunk) stays; above it a
step reads as many tokens as fit in STALL_STEPS decode steps while answers are running (their
longest gap is then about STALL_STEPS + 1 of their usual ones, and the newcomer pays about one
decode step per STALL_STEPS of its own reading), or in IDLE_STEP_S when nothing else runs (few
steps, so a lone prompt reads almost as fast as unchunked, while a cancel or a deadline still
takes effect within about that time). Times are moving averages of the steps measured so far.
CPUs only: on a GPU a step returns before its kernels finish (its time would need a host sync
the step does not make), so GPUs keep their fixed budget."""
from __future__ import annotations

from typing import Optional

STALL_STEPS = 5.0  # a prompt step may take this many decode steps while answers are running
IDLE_STEP_S = 1.0  # and about this long when no answer is running
SMOOTHING = 0.3  # weight of the newest measurement in the moving averages


class PrefillPace:
    """The token budget of the next prefill step (None: whole prompts), from measured steps."""

    def __init__(self, floor: int, paced: bool = True):
        """floor: the least tokens' worth a step reads (0: whole prompts); paced: read more per
        step as measured times allow (else always `floor`)."""
        self.floor = floor
        self.paced = paced
        self.decode_s: Optional[float] = None  # one decode step
        self.token_s: Optional[float] = None  # one prompt token's worth of reading

    def budget(self, decoding: bool) -> Optional[int]:
        """Tokens' worth for the next prompt step; `decoding`: answers are running meanwhile."""
        if not self.floor:
            return None
        if not self.paced or self.token_s is None or (decoding and self.decode_s is None):
            return self.floor
        seconds = STALL_STEPS * self.decode_s if decoding else IDLE_STEP_S
        return max(self.floor, int(seconds / self.token_s))

    def read(self, seconds: float, budget: Optional[int], used_up: bool) -> None:
        """A prompt step took `seconds`; `used_up`: its budget ran out (a prompt is still being
        read), so the step read `budget` tokens' worth (a step that finished its prompts early
        says nothing about the rate)."""
        if budget and used_up:
            self.token_s = _average(self.token_s, seconds / budget)

    def decoded(self, seconds: float) -> None:
        """A decode step took `seconds`."""
        self.decode_s = _average(self.decode_s, seconds)


def _average(old: Optional[float], new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

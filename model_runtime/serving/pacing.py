"""How much prompt the engine reads per step (chunked prefill), from how long steps take here.

A fixed token budget cannot fit every machine: on a GPU 512 tokens take about one decode step, on
two CPU cores 32 tokens of a mid-size model take about two, and the same 32 tokens of a full-size
one take two seconds. So by default the budget is paced by time (a `--prefill-chunk` given
explicitly is kept fixed). The device's floor (engine.default_prefill_chunk) stays; above it,
while answers are running, a prompt step is sized so that they wait about GAP_STEPS of their
usual gaps for their next token: a step that packs their decode rows with the prompt's chunk
(decode_batch.prefill_and_step) may take GAP_STEPS decode steps' time, a prompt step followed by
a decode step one less. When nothing else runs a step takes about IDLE_STEP_S (few steps, so a
lone prompt reads almost as fast as unchunked, while a cancel or a deadline still takes effect
within about that time). Larger steps cost the newcomer less: each step reads every weight once
more, and prompt chunks under about 100 tokens make slower matrix products (bfloat16, 2 cores of
an EPYC Zen 4, hidden 1024: 330 GFLOPS at 64 rows against 370 from 128 on). Times are medians of
the last WINDOW steps measured: one slow step (a collection, a busy neighbour) moves no budget,
and a newcomer's first steps, whose rate differs from the rest, are forgotten within a few steps
(a moving average took about ten, and its outliers made the longest stalls). CPUs only: on a GPU
a step returns before its kernels finish (its time would need a host sync the step does not
make), so GPUs keep their fixed budget."""
from __future__ import annotations

from collections import deque
from statistics import median
from typing import Optional

GAP_STEPS = 6.0  # running answers wait about this many of their usual gaps while a prompt is read
IDLE_STEP_S = 1.0  # and about this long when no answer is running
WINDOW = 5  # the steps each estimate is the median of


class PrefillPace:
    """The token budget of the next prefill step (None: whole prompts), from measured steps."""

    def __init__(self, floor: int, paced: bool = True):
        """floor: the least tokens' worth a step reads (0: whole prompts); paced: read more per
        step as measured times allow (else always `floor`)."""
        self.floor = floor
        self.paced = paced
        self._decode_times: deque[float] = deque(maxlen=WINDOW)  # of decode steps
        self._token_times: deque[float] = deque(maxlen=WINDOW)  # of a prompt token's worth of reading

    @property
    def decode_s(self) -> Optional[float]:
        """One decode step's time (None before one is measured)."""
        return median(self._decode_times) if self._decode_times else None

    @property
    def token_s(self) -> Optional[float]:
        """One prompt token's worth of reading (None before a prompt step is measured)."""
        return median(self._token_times) if self._token_times else None

    def budget(self, decoding: bool, packed: bool = False) -> Optional[int]:
        """Tokens' worth for the next prompt step; `decoding`: answers are running meanwhile,
        `packed`: in the same forward (else their decode step follows it)."""
        if not self.floor:
            return None
        token_s, decode_s = self.token_s, self.decode_s
        if not self.paced or token_s is None or (decoding and decode_s is None):
            return self.floor
        seconds = (GAP_STEPS - (not packed)) * decode_s if decoding else IDLE_STEP_S
        return max(self.floor, int(seconds / token_s))

    def read(self, seconds: float, budget: Optional[int], used_up: bool) -> None:
        """A prompt step took `seconds`; `used_up`: its budget ran out (a prompt is still being
        read), so the step read `budget` tokens' worth (a step that finished its prompts early
        says nothing about the rate)."""
        if budget and used_up:
            self._token_times.append(seconds / budget)

    def decoded(self, seconds: float) -> None:
        """A decode step took `seconds`."""
        self._decode_times.append(seconds)

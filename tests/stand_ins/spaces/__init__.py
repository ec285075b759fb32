"""A stand-in for Hugging Face's `spaces` package that behaves like ZeroGPU where an app can get
it wrong (tests only: put tests/stand_ins on PYTHONPATH). Read from spaces 0.51
(`spaces/zero/wrappers.py`):

- `GPU(fn)` / `GPU(duration=...)(fn)`: every call runs `fn` in a child process forked with
  multiprocessing's "fork" context; the arguments are pickled on the way in and every value
  (or each value a generator yields) is pickled back. `duration` (seconds, or a function of the
  call's arguments) is asked for; a call still running after it is killed ("GPU task aborted").
- A generator call closed by the caller (GeneratorExit) sets a stop event that the child checks
  after each value it yields, then it closes the generator: the work ends at its next step.
- In the main process there is no GPU: initialising CUDA raises, and so does calling any
  `torch.nn.Module` (model computation belongs inside a GPU call; the real main process holds
  only stand-in tensors). The child lifts both.
- Exceptions in the child come back as one raised in the caller with the child's message.

CHATGLM_STANDIN_SPACES_LOG, if set, names a file that gets one JSON line per call
({"pid": child pid, "duration": seconds asked}) for tests to read.
"""
from __future__ import annotations

import functools
import inspect
import json
import multiprocessing
import os
import pickle
import traceback

import torch

__version__ = "0.0-standin"

_FORK = multiprocessing.get_context("fork")
_MAIN_PID = os.getpid()
_ORIGINAL = {"lazy_init": torch.cuda._lazy_init, "init": torch.cuda.init,
             "module_call": torch.nn.Module.__call__}


class ZeroGPUError(RuntimeError):
    pass


def _no_gpu_here(*args, **kwargs):
    raise ZeroGPUError("CUDA used in the main process: on ZeroGPU the GPU exists only inside @spaces.GPU calls")


def _module_call_outside_gpu(self, *args, **kwargs):
    if os.getpid() == _MAIN_PID:
        raise ZeroGPUError(f"{type(self).__name__} called in the main process: on ZeroGPU model computation "
                           "must run inside a @spaces.GPU call")
    return _ORIGINAL["module_call"](self, *args, **kwargs)


torch.cuda._lazy_init = _no_gpu_here
torch.cuda.init = _no_gpu_here
torch.nn.Module.__call__ = _module_call_outside_gpu


def _in_child() -> None:
    torch.cuda._lazy_init = _ORIGINAL["lazy_init"]
    torch.cuda.init = _ORIGINAL["init"]
    torch.nn.Module.__call__ = _ORIGINAL["module_call"]


def _record(pid: int, duration) -> None:
    path = os.environ.get("CHATGLM_STANDIN_SPACES_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps({"pid": pid, "duration": duration}) + "\n")


def _child(task, payload: bytes, sender, stop, generator: bool) -> None:
    _in_child()
    try:
        args, kwargs = pickle.loads(payload)
        if not generator:
            sender.send(("value", task(*args, **kwargs)))
        else:
            values = task(*args, **kwargs)
            for value in values:
                if stop.is_set():
                    values.close()
                    break
                sender.send(("value", value))
        sender.send(("end", None))
    except Exception as error:  # noqa: BLE001 - reported to the caller, like the real worker does
        sender.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        sender.close()


class _Call:
    """One forked child running one call; values come back through a pipe."""

    def __init__(self, task, duration, args, kwargs, generator: bool):
        seconds = duration(*args, **kwargs) if callable(duration) else (duration or 60)
        payload = pickle.dumps((args, kwargs))  # what cannot cross to the worker fails here, as on ZeroGPU
        self.receiver, sender = _FORK.Pipe(duplex=False)
        self.stop = _FORK.Event()
        self.process = _FORK.Process(target=_child, args=(task, payload, sender, self.stop, generator), daemon=True)
        self.process.start()
        sender.close()
        _record(self.process.pid, seconds)
        self.seconds = float(seconds)

    def results(self):
        while True:
            if not self.receiver.poll(self.seconds):
                self.process.kill()
                raise ZeroGPUError(f"GPU task aborted: it ran past its duration of {self.seconds:g} s")
            try:
                kind, value = self.receiver.recv()
            except EOFError:
                raise ZeroGPUError("GPU task aborted: the worker process died") from None
            if kind == "error":
                raise ZeroGPUError(value)
            if kind == "end":
                return
            yield value

    def close(self) -> None:
        self.receiver.close()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def GPU(task=None, *, duration=None, size=None):
    """The decorator; like the real one, also usable as @GPU and @GPU(duration=...)."""
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    if inspect.isgeneratorfunction(task):
        @functools.wraps(task)
        def generator_call(*args, **kwargs):
            call = _Call(task, duration, args, kwargs, generator=True)
            try:
                for value in call.results():
                    try:
                        yield value
                    except GeneratorExit:
                        call.stop.set()
                        raise
            finally:
                call.close()
        return generator_call

    @functools.wraps(task)
    def regular_call(*args, **kwargs):
        call = _Call(task, duration, args, kwargs, generator=False)
        try:
            for value in call.results():
                return value
        finally:
            call.close()
    return regular_call

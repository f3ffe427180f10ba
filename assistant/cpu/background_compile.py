"""A compile in a background thread, and the replies served meanwhile.

Compiling the decode steps (compiled_decoder.py) is half a minute or more of Python in one thread (Dynamo's
tracing, inductor's passes). A reply computed meanwhile in another thread needs the GIL back around each of
the few hundred operator calls of every token, and waits for it each time. Two remedies:

- `short_gil_slices()`: while a compile runs, Python hands the GIL over every 0.1 ms instead of every 5 ms.
- `replying()` / `yielding_to_replies()`: the engine marks the stretches where a reply computes; a compile
  thread that yields to replies (serve.py's: a person waits on each reply) stops at its next audited event
  (Python raises them thousands of times a second in that code: `id()`, `compile`, `exec`, `sys._getframe`)
  and waits, without the GIL, until no reply computes. Replies during a compile then take about what they take
  without one (docs/performance.md).

A compile yields at most PAUSE_ALLOWANCE_S plus PAUSE_SHARE of the time since it started: under replies
without end it still finishes (in about twice its time), and should a reply ever wait on something the paused
thread holds (a lock, a module it is importing), the compile goes on instead of both waiting forever.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

# While steps compile in the background, the compile's Python hands the GIL to the thread serving replies every
# 0.1 ms instead of Python's 5 ms: every one of an eager reply's few hundred operator calls waits for it.
COMPILE_SWITCH_INTERVAL = 1e-4
_switch_lock = threading.Lock()
_compiles_running = 0
_saved_switch_interval = 0.005


@contextlib.contextmanager
def short_gil_slices():
    """Python's thread switch interval at most COMPILE_SWITCH_INTERVAL within the block (nested and concurrent
    blocks too; the interval before the first one comes back after the last)."""
    global _compiles_running, _saved_switch_interval
    with _switch_lock:
        if _compiles_running == 0:
            _saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_switch_interval, COMPILE_SWITCH_INTERVAL))
        _compiles_running += 1
    try:
        yield
    finally:
        with _switch_lock:
            _compiles_running -= 1
            if _compiles_running == 0:
                sys.setswitchinterval(_saved_switch_interval)


PAUSE_ALLOWANCE_S = 10.0
PAUSE_SHARE = 0.5
# the frequent events of pure computation; not those of imports or file access, which hold locks
PAUSE_AT_EVENTS = frozenset({"builtins.id", "compile", "exec", "sys._getframe"})

_reply_lock = threading.Lock()
_replies = 0  # replies computing now
_no_replies = threading.Event()
_no_replies.set()
_yielding_threads: dict[int, list[float]] = {}  # thread id -> [when it started, seconds paused]
_hook_installed = False


@contextlib.contextmanager
def replying():
    """Marks a reply's computation (a prompt, a decode step, an image): compiles that yield to replies wait."""
    global _replies
    with _reply_lock:
        if _replies == 0:
            _no_replies.clear()
        _replies += 1
    try:
        yield
    finally:
        with _reply_lock:
            _replies -= 1
            if _replies == 0:
                _no_replies.set()


def computed_while_replying(iterator):
    """The items of `iterator`, each computed within `replying()` (not the caller's work between them)."""
    iterator = iter(iterator)
    end = object()
    try:
        while True:
            with replying():
                item = next(iterator, end)
            if item is end:
                return
            yield item
    finally:  # a caller that stops early closes `iterator` now, as a plain for loop over it would
        if hasattr(iterator, "close"):
            iterator.close()


@contextlib.contextmanager
def yielding_to_replies(enabled: bool = True):
    """Within the block, the calling thread pauses while any reply computes (module docstring)."""
    global _hook_installed
    if not enabled:
        yield
        return
    with _reply_lock:
        if not _hook_installed:  # audit hooks cannot be removed: one for the process, idle unless a reply computes
            sys.addaudithook(_pause_for_replies)
            _hook_installed = True
    me = threading.get_ident()
    _yielding_threads[me] = [time.monotonic(), 0.0]
    try:
        yield
    finally:
        del _yielding_threads[me]


def _pause_for_replies(event, args) -> None:
    if not _replies or event not in PAUSE_AT_EVENTS:
        return
    timing = _yielding_threads.get(threading.get_ident())
    if timing is None:
        return
    started, paused = timing
    now = time.monotonic()
    allowed = PAUSE_ALLOWANCE_S + PAUSE_SHARE * (now - started) - paused
    if allowed > 0:
        timing[1] = float("inf")  # no second pause from events the wait itself raises
        _no_replies.wait(allowed)
        timing[1] = paused + time.monotonic() - now

"""One thread for every model call of the server: loading, prompts, decode steps.

Why: PyTorch's CPU kernels fork OpenMP (libgomp) workers, and each thread that runs them gets its own
team of workers. Once the process holds more OpenMP threads than cores (the main thread's team from
loading plus a team per request thread), libgomp stops letting idle workers spin, and every one of the
few hundred parallel regions of a decode step waits for a worker to wake up: replies ran about 3x slower
on a second thread (docs/performance.md). The web server's request threads therefore only
queue work here and stream the results back.
"""

from __future__ import annotations

import queue
import threading

from assistant.cpu.background_compile import replying

_DONE = object()


class EngineThread:
    """Runs `load()` (-> an Engine) and then every `stream_chat` on one daemon thread, in arrival order.
    Errors of `load()` are raised by the constructor; errors of a reply by its iterator."""

    def __init__(self, load):
        self._jobs: queue.Queue = queue.Queue()
        self._loaded = threading.Event()
        self._error: BaseException | None = None
        self.engine = None
        threading.Thread(target=self._run, args=(load,), name="engine", daemon=True).start()
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        self.model = self.engine.model
        self.processor = self.engine.processor
        self.runtime = self.engine.runtime

    def _run(self, load) -> None:
        try:
            self.engine = load()
        except BaseException as e:  # reported by the constructor, on the caller's thread
            self._error = e
            return
        finally:
            self._loaded.set()
        while True:
            self._jobs.get()()

    def explain(self, messages, images, answer, method="gradient"):
        """Engine.explain, computed on the engine thread."""
        done = threading.Event()
        result: list = []

        def job() -> None:
            try:
                result.append(self.engine.explain(messages, images, answer, method))
            except BaseException as e:  # raised on the caller's thread
                result.append(e)
            finally:
                done.set()

        self._jobs.put(job)
        done.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def stream_chat(self, session, config=None, should_stop=None):
        """Engine.stream_chat, computed on the engine thread; closing this iterator (a client gone, Stop)
        stops the generation at its next token."""
        out: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def stop() -> bool:
            return cancelled.is_set() or (should_stop is not None and should_stop())

        def job() -> None:
            try:
                with replying():  # the whole reply, also between its tokens: a compile that yields to replies waits
                    for delta in self.engine.stream_chat(session, config, should_stop=stop):
                        out.put(delta)
                        if cancelled.is_set():
                            break
                out.put(_DONE)
            except BaseException as e:  # raised on the consumer's thread
                out.put(e)

        self._jobs.put(job)
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

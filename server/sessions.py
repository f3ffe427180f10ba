"""Engine sessions per browser tab (Gradio session hash), least recently used ones forgotten, and each tab's
Stop flag (a reply checks it between tokens, so stopping is a normal end of the reply, not a cancelled event)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from assistant.inference.engine import ChatSession


class SessionStore:
    def __init__(self, max_sessions: int = 64):
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> ChatSession:
        with self._lock:
            session = self._sessions.pop(key, None) or ChatSession()
            self._sessions[key] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)  # its KV cache goes; its history lives in the browser
            return session

    def drop(self, key: str) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def stop_flag(self, key: str) -> threading.Event:
        with self._lock:
            if key not in self._stops and len(self._stops) > 4 * self.max_sessions:
                self._stops = {k: v for k, v in self._stops.items() if k in self._sessions}
            return self._stops.setdefault(key, threading.Event())

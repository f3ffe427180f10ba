"""Engine sessions per browser tab (Gradio session hash), least recently used ones forgotten."""

from __future__ import annotations

import threading
from collections import OrderedDict

from assistant.inference.engine import ChatSession


class SessionStore:
    def __init__(self, max_sessions: int = 64):
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
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

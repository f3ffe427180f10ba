"""The line of chat replies waiting for the model, so a waiting person sees their place in it.

Gradio's own queue would hold a waiting reply out of sight (its message not even shown); instead every reply
event starts at once and waits here, first come first served, while its chat shows how many are ahead.
"""

from __future__ import annotations

import itertools
import threading


class ReplyLine:
    def __init__(self, slots: int = 1):
        self.slots = max(1, slots)
        self._waiting: list[int] = []
        self._running: set[int] = set()
        self._tickets = itertools.count()
        self._changed = threading.Condition()

    def join(self) -> int:
        with self._changed:
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            return ticket

    def ahead(self, ticket: int) -> int:
        """Replies that go before this one: those running, and those waiting in front of it."""
        with self._changed:
            return len(self._running) + self._waiting.index(ticket) if ticket in self._waiting else 0

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait up to `timeout` s for this ticket's turn; True once it holds a slot."""
        with self._changed:
            if ticket in self._running:
                return True
            self._changed.wait_for(lambda: self._may_start(ticket), timeout=timeout)
            if self._may_start(ticket):
                self._waiting.remove(ticket)
                self._running.add(ticket)
                return True
            return False

    def leave(self, ticket: int) -> None:
        with self._changed:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._running.discard(ticket)
            self._changed.notify_all()

    def _may_start(self, ticket: int) -> bool:
        return len(self._running) < self.slots and bool(self._waiting) and self._waiting[0] == ticket

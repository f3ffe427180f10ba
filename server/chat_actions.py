"""What each control of the chat does, apart from how the page is laid out (ui.py).

Every action is two or three steps: a quick one that runs at once (it shows the question, disables the buttons
and decides whether a reply is wanted), `reply`, which waits its turn in the reply line and streams the answer,
and `finish`, which re-enables the controls and saves the conversation in the browser. Nothing raises into
Gradio: a person's mistake (an empty message, a broken image, nothing to retry) is a short warning, the box
stays usable and keeps what was typed, and the server logs one line.
"""

from __future__ import annotations

import logging
import math

import gradio as gr

from assistant.inference.engine import Engine
from assistant.inference.generation import GenerationConfig
from assistant.inputs.chat_format import ConversationError
from assistant.inputs.images import ImageError

from .conversation import (assistant_turn, chatbot_index_to_turn, image_label, to_chatbot, to_engine, user_turn,
                           valid_turns)
from .image_store import ImageStore
from .reply_line import ReplyLine
from .sessions import SessionStore

log = logging.getLogger("server.chat")

# Sampling that makes Retry give another answer (LLaVA's demo uses the same); the API and batch VQA stay greedy.
CHAT_TEMPERATURE = 0.2
CHAT_TOP_P = 0.7
WAITING = "…"


class Problem(Exception):
    """A person's mistake or an expected condition: shown as a warning, logged as one line."""


class ChatActions:
    def __init__(self, engine: Engine, store: ImageStore, sessions: SessionStore, line: ReplyLine, max_bytes: int):
        self.engine, self.store, self.sessions, self.line, self.max_bytes = engine, store, sessions, line, max_bytes

    # The quick steps return (box, chatbot, turns, pending). `busy` (ui.py) adds the controls' states.

    def take(self, message) -> tuple[str, list[str]]:
        """The box's text and its images' keys in the image store; Problem when there is nothing to send or an
        image cannot be used."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            raise Problem("Type a question or attach an image first.")
        keys = []
        for path in files:
            try:
                keys.append(self.store.add(path, self.max_bytes))
            except ImageError as e:
                raise Problem(f"Cannot use this image: {e}") from None
        return text, keys

    def send(self, message, turns, request: gr.Request):
        turns = list(turns or [])
        try:
            text, keys = self.take(message)
        except Problem as e:
            return self._refused(e, request) + (gr.skip(), turns, False)
        self._stop(request).clear()
        turns.append(user_turn(text, keys))
        return gr.MultimodalTextbox(value=None), self._chat(turns, pending=True), turns, True

    def retry(self, turns, request: gr.Request):
        turns = _without_trailing_replies(turns)
        if not turns:
            return self._refused(Problem("Nothing to retry yet."), request) + (gr.skip(), turns, False)
        self._stop(request).clear()
        return gr.skip(), self._chat(turns, pending=True), turns, True

    def edit(self, turns, edit_data: gr.EditData, request: gr.Request):
        """A user message edited in place: its images kept, the turns after it dropped and answered again."""
        turns = list(turns or [])
        try:
            i, is_text = chatbot_index_to_turn(turns, edit_data.index)
        except IndexError:
            return self._refused(Problem("That message is no longer in the conversation."), request) + (
                self._chat(turns), turns, False)
        if not is_text or not isinstance(edit_data.value, str):  # an image of an edited message: nothing to do
            return gr.skip(), gr.skip(), turns, False
        text = edit_data.value.strip()
        if turns[i]["role"] != "user" or not (text or turns[i]["images"]):
            problem = Problem("Only your own messages can be edited." if turns[i]["role"] != "user" else
                              "An edited message needs some text.")
            return self._refused(problem, request) + (self._chat(turns), turns, False)
        turns = turns[:i] + [user_turn(text, turns[i]["images"])]
        self._stop(request).clear()
        return gr.skip(), self._chat(turns, pending=True), turns, True

    def undo(self, turns, request: gr.Request):
        """Remove the last exchange and put the question back in the box, images included."""
        turns = _without_trailing_replies(turns)
        if not turns:
            return self._refused(Problem("Nothing to undo."), request) + (gr.skip(), turns, False)
        last = turns.pop()
        return self._to_box(last), self._chat(turns), turns, False

    def new_chat(self, request: gr.Request):
        """Both the New chat button and the chat's trash icon: a new conversation here and in the engine."""
        self._stop(request).set()  # a reply still streaming ends
        self.sessions.drop(_tab(request))
        return gr.skip(), [], [], False

    def stop(self, request: gr.Request):
        self._stop(request).set()

    def whole_turn(self, message, turns, system, temperature, top_p, max_tokens, request: gr.Request):
        """A question in, the conversation with its answer out, in one call: the `chat` endpoint for gradio_client
        scripts, which get a problem as an error rather than a warning."""
        try:
            text, keys = self.take(message)
        except Problem as e:
            log.info("chat: %s", e)
            raise gr.Error(str(e)) from None
        turns = list(turns or []) + [user_turn(text, keys)]
        self._stop(request).clear()
        box = None
        for _, turns_update, box_update in self.reply(turns, True, system, temperature, top_p, max_tokens, request):
            turns = turns_update if isinstance(turns_update, list) else turns
            box = box_update if isinstance(box_update, gr.MultimodalTextbox) else box
        if box is not None:  # not answered: the reply said why in a warning
            raise gr.Error("Could not answer this message (see the server log).")
        return self._chat(turns), turns

    def where_it_looked(self, turns, like: gr.LikeData, request: gr.Request):
        """The relevance map of one answer over the conversation's images so far, and how much it relied on them:
        (heatmaps with their labels, words, whether to open the panel)."""
        from assistant.explain import heatmap

        turns = list(turns or [])
        try:
            i, _ = chatbot_index_to_turn(turns, like.index if isinstance(like.index, int) else like.index[0])
            if turns[i]["role"] != "assistant" or i == 0:
                raise Problem("Choose one of the model's answers.")
            messages, paths, keys = to_engine(turns[:i], self.store)
            if not paths:
                raise Problem("This answer came without an image: there is nothing to map.")
            e = self.engine.explain(messages, [str(p) for p in paths], turns[i]["text"])
        except Problem as problem:
            return self._refused(problem, request) + (gr.skip(), gr.skip())
        except (IndexError, ImageError, ValueError, ConversationError) as error:
            return self._refused(Problem(f"Cannot explain this answer: {error}"), request) + (gr.skip(), gr.skip())
        pictures = [(heatmap(path, m), image_label(k + 1)) for k, (path, m) in enumerate(zip(paths, e.maps))]
        words = (f"**{e.reliance_words()}** With a blank image{'s' if len(paths) > 1 else ''} instead, each word of "
                 f"the answer would be {math.exp(max(e.reliance, 0.0)):.1f}x less likely. Red marks the parts of the "
                 f"image that pushed the model towards this answer ({e.seconds:.1f} s to compute).")
        return pictures, words, gr.Accordion(open=True)

    def restore(self, saved):
        """The conversation saved in this browser, back after a reload."""
        turns = valid_turns(saved, self.store)
        return self._chat(turns), turns

    # The reply: (chatbot, turns, box) while it waits, streams and ends.

    def reply(self, turns, pending, system, temperature, top_p, max_tokens, request: gr.Request):
        turns = list(turns or [])
        if not pending or not turns or turns[-1]["role"] != "user":
            yield gr.skip(), gr.skip(), gr.skip()
            return
        stop = self._stop(request)
        ticket = self.line.join()
        try:
            shown_ahead = None
            while not self.line.wait(ticket, timeout=0.5):
                if stop.is_set():
                    yield self._chat(turns[:-1]), turns[:-1], self._to_box(turns[-1])
                    return
                ahead = self.line.ahead(ticket)
                if ahead != shown_ahead:
                    shown_ahead = ahead
                    place = f"Waiting for the model: {ahead} {'reply' if ahead == 1 else 'replies'} ahead of yours"
                    yield self._chat(turns, pending=True, note=place), gr.skip(), gr.skip()
            yield from self._generate(turns, stop, system, temperature, top_p, max_tokens, request)
        finally:
            self.line.leave(ticket)

    def _generate(self, turns, stop, system, temperature, top_p, max_tokens, request):
        session = self.sessions.get(_tab(request))
        session.system_prompt = (system or "").strip() or None
        config = GenerationConfig(max_new_tokens=int(max_tokens or 256),
                                  temperature=float(CHAT_TEMPERATURE if temperature is None else temperature),
                                  top_p=float(top_p or 1.0))
        question = turns[-1]
        notices = len(session.notices)
        text = ""
        try:
            messages, paths, keys = to_engine(turns, self.store)
            session.sync(messages, paths, keys)
            for delta in self.engine.stream_chat(session, config, should_stop=stop.is_set):
                text += delta
                yield self._chat(turns + [assistant_turn(text)]), gr.skip(), gr.skip()
        except (ConversationError, ImageError, ValueError) as e:
            log.info("chat: could not answer: %s", e)
            gr.Warning(f"Could not answer: {e} Your question is back in the box.")
            yield self._chat(turns[:-1]), turns[:-1], self._to_box(question)
            return
        except Exception as e:  # noqa: BLE001 - the page must go on whatever failed
            log.exception("chat: reply failed")
            gr.Warning(f"Something went wrong ({type(e).__name__}). Your question is back in the box: send it "
                       "again, or start a new chat.")
            yield self._chat(turns[:-1]), turns[:-1], self._to_box(question)
            return
        if stop.is_set() and not text.strip():  # stopped before a word: the question goes back to the box
            yield self._chat(turns[:-1]), turns[:-1], self._to_box(question)
            return
        if len(session.notices) > notices:
            gr.Warning(session.notices[-1])
        turns = turns + [assistant_turn(text)]
        yield self._chat(turns), turns, gr.skip()

    # helpers

    def _chat(self, turns, pending: bool = False, note: str | None = None):
        messages = to_chatbot(turns, self.store)
        if pending:
            messages.append({"role": "assistant", "content": f"*{note}*" if note else WAITING})
        return messages

    def _to_box(self, turn: dict):
        files = [str(p) for p in (self.store.path_if_present(k) for k in turn.get("images", [])) if p is not None]
        return gr.MultimodalTextbox(value={"text": turn.get("text", ""), "files": files})

    def _stop(self, request):
        return self.sessions.stop_flag(_tab(request))

    @staticmethod
    def _refused(problem: Exception, request) -> tuple:
        log.info("chat: %s", problem)
        gr.Warning(str(problem))
        return (gr.skip(),)


def _without_trailing_replies(turns) -> list[dict]:
    """The conversation up to and with its last question (the replies after it dropped)."""
    turns = list(turns or [])
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns


def _tab(request) -> str:
    return request.session_hash if request is not None and request.session_hash else "default"

"""The Gradio chat page: images in any turn (attach, paste or drop), streaming, Send that becomes Stop, retry,
undo, edit, a new chat, settings, examples. What each control does is in chat_actions.py.

The conversation lives in the browser (it survives a reload) and names its images by their key in the
server's image store; the engine session behind it (KV cache, encoded images) is found by the tab's session
hash and re-synced with that history every turn, so retry / undo / edit never confuse it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from assistant.inference.engine import Engine

from .chat_actions import CHAT_TEMPERATURE, CHAT_TOP_P, ChatActions
from .image_store import ImageStore
from .reply_line import ReplyLine
from .sessions import SessionStore

EXAMPLES_DIR = Path(__file__).parent / "examples"
EXAMPLES = [
    ("scene1.png", "What color is the diamond?"),
    ("scene2.png", "How many objects are there?"),
    ("scene3.png", "Is the triangle at the top or the bottom?"),
    ("scene2.png", "Describe the image."),
    ("photo_cat.jpg", "What is in this picture?"),
]
BROWSER_KEY = "vision-assistant-chat"
WHERE = "Where did it look?"


def about_model(engine: Engine) -> str:
    config = engine.model.config
    lines = [config.description or "",
             f"- Language model: `{config.llm}`",
             f"- Vision tower: {config.vision.model_type}; projector: {config.projector.type}"]
    if engine.runtime.quantized:
        lines.append(f"- Weights: {engine.runtime.quantized} for speed on this CPU (answers can differ slightly from "
                     "full precision; start the server with `--quantize none` for full precision)")
    lines += [f"- {note}" for note in engine.runtime.notes]
    return "\n".join(lines)


def header(engine: Engine) -> str:
    config = engine.model.config
    summary = config.summary or ("Untrained: it cannot see images yet." if not config.trained
                                 else "Answers questions about the images you attach.")
    return f"### Vision Assistant\n{summary}"


def build_ui(engine: Engine, *, max_image_mb: float = 10, sessions: SessionStore | None = None,
             store: ImageStore | None = None, concurrency: int = 1) -> gr.Blocks:
    store = store or ImageStore()
    actions = ChatActions(engine, store, sessions or SessionStore(), ReplyLine(concurrency),
                          int(max_image_mb * 1024 * 1024))

    with gr.Blocks(title="Vision Assistant", fill_height=True) as demo:
        gr.Markdown(header(engine))
        with gr.Accordion("About this model", open=False):
            gr.Markdown(about_model(engine))
        turns = gr.State([])
        pending = gr.State(False)  # the quick step asked for a reply
        saved = gr.BrowserState([], storage_key=BROWSER_KEY, secret=store.browser_secret())
        chatbot = gr.Chatbot(label="Chat", height=480, editable="user", buttons=["copy"], scale=1,
                             group_consecutive_messages=False, feedback_options=(WHERE,))
        box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False, stop_btn=False,
                                   placeholder="Ask about an image: attach, paste or drop one or more, or just chat",
                                   sources=["upload"])
        with gr.Accordion(WHERE, open=False) as where_panel:
            where_words = gr.Markdown(f"Choose {WHERE!r} under one of the model's answers (the flag icon).")
            # fit_columns=False: one image keeps a column's width instead of stretching over the whole row
            where_images = gr.Gallery(label="Where the answer came from", columns=4, height=260, elem_id="where-gallery",
                                      object_fit="contain", fit_columns=False, interactive=False)
        with gr.Row():
            retry_btn = gr.Button("Retry", size="sm")
            undo_btn = gr.Button("Undo", size="sm")
            new_btn = gr.Button("New chat", size="sm")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt", placeholder="(the model's default)", lines=2)
            temperature = gr.Slider(0, 2, value=CHAT_TEMPERATURE, step=0.05,
                                    label="Temperature (0 = always the same answer)")
            top_p = gr.Slider(0.05, 1, value=CHAT_TOP_P, step=0.05, label="Top-p")
            max_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
        knobs = [system, temperature, top_p, max_tokens]
        gr.Examples(examples=[[{"text": q, "files": [str(EXAMPLES_DIR / f)]}] for f, q in EXAMPLES], inputs=[box],
                    label="Examples")

        # Every event is queued (so its warnings reach the page) without a concurrency limit: the quick steps never
        # wait behind a reply, and replies wait in the reply line, where a person can see their place.
        quick = [box, chatbot, turns, pending]
        controls = [box, chatbot, retry_btn, undo_btn, new_btn]

        def busy(on: bool):
            """While a reply streams: Send is Stop, and nothing may change the conversation under it."""
            return (gr.MultimodalTextbox(submit_btn=not on, stop_btn=on), gr.Chatbot(editable=None if on else "user"),
                    *(gr.Button(interactive=not on) for _ in range(3)))

        def start(quick_result):
            box_value, chat, new_turns, wanted = quick_result
            if not wanted:
                return quick_result + busy(False)[2:]
            box_update = gr.MultimodalTextbox(value=None, submit_btn=False, stop_btn=True) \
                if isinstance(box_value, gr.MultimodalTextbox) else gr.MultimodalTextbox(submit_btn=False, stop_btn=True)
            return (box_update, gr.Chatbot(value=chat, editable=None), new_turns, wanted) + busy(True)[2:]

        def finish(current):
            return (*busy(False), current, False)

        def with_reply(event):
            """The queued reply and the step that frees the controls, after a quick step."""
            return (event.then(actions.reply, [turns, pending, *knobs], [chatbot, turns, box], api_name=False,
                               concurrency_limit=None, show_progress="hidden")  # it waits in the reply line
                    .then(finish, [turns], [*controls, saved, pending], concurrency_limit=None, api_name=False))

        buttons = [retry_btn, undo_btn, new_btn]

        def send(message, current, request: gr.Request):
            return start(actions.send(message, current, request))

        def retry(current, request: gr.Request):
            return start(actions.retry(current, request))

        def edit(current, edit_data: gr.EditData, request: gr.Request):
            return start(actions.edit(current, edit_data, request))

        with_reply(box.submit(send, [box, turns], [*quick, *buttons], concurrency_limit=None, api_name=False))
        with_reply(retry_btn.click(retry, [turns], [*quick, *buttons], concurrency_limit=None, api_name=False))
        with_reply(chatbot.edit(edit, [turns], [*quick, *buttons], concurrency_limit=None, api_name=False))
        box.stop(actions.stop, None, None, concurrency_limit=None, api_name=False)
        undo_btn.click(actions.undo, [turns], quick, concurrency_limit=None, api_name="undo").then(
            lambda t: t, [turns], [saved], concurrency_limit=None, api_name=False)
        for trigger in (new_btn.click, chatbot.clear):
            trigger(actions.new_chat, None, quick, concurrency_limit=None, api_name=False).then(
                lambda: ([], *busy(False)), None, [saved, *controls], concurrency_limit=None, api_name=False)
        api_only = gr.Button(visible=False)  # one whole turn per call, for gradio_client scripts
        api_only.click(actions.whole_turn, [box, turns, *knobs], [chatbot, turns], api_name="chat")
        chatbot.like(actions.where_it_looked, [turns], [where_images, where_words, where_panel],
                     concurrency_limit=None, api_name=False)
        demo.load(actions.restore, [saved], [chatbot, turns], concurrency_limit=None, api_name=False)
    return demo

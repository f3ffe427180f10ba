"""The Gradio chat: images in any turn, streaming, stop, retry, undo, edit, clear, settings, examples.

The chat history lives in the browser tab's state (each tab is its own conversation); the engine
session behind it (KV cache, encoded images) is found by the tab's session hash and re-synced with
that history every turn, so retry / undo / edit never confuse it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from assistant.inputs.chat_format import ConversationError
from assistant.inference.engine import Engine
from assistant.inference.generation import GenerationConfig
from assistant.inputs.images import ImageError

from .conversation import (assistant_turn, chatbot_index_to_turn, check_upload, to_chatbot, to_engine,
                           user_turn)
from .sessions import SessionStore

EXAMPLES_DIR = Path(__file__).parent / "examples"
EXAMPLES = [
    ("scene1.png", "What color is the diamond?"),
    ("scene2.png", "How many objects are there?"),
    ("scene3.png", "Is the triangle at the top or the bottom?"),
    ("scene2.png", "Describe the image."),
    ("photo_cat.jpg", "What is in this picture?"),
]


def build_ui(engine: Engine, *, max_image_mb: float = 10, sessions: SessionStore | None = None) -> gr.Blocks:
    sessions = sessions or SessionStore()
    config = engine.model.config
    max_bytes = int(max_image_mb * 1024 * 1024)
    banner = ("**Untrained model.** " if not config.trained else "") + (config.description or "")
    if engine.runtime.quantized:
        banner += (f" Weights: {engine.runtime.quantized} (for speed on the CPU; answers can differ slightly from "
                   "full precision; `--quantize none` for fp32).")

    def settings(system, temperature, top_p, max_tokens):
        """Values from the settings panel (a browser may send None for an untouched field)."""
        gen = GenerationConfig(max_new_tokens=int(max_tokens or 256), temperature=float(temperature or 0.0),
                               top_p=float(top_p or 1.0))
        return (system or "").strip() or None, gen

    def generate(turns, system, temperature, top_p, max_tokens, request: gr.Request):
        """Stream the assistant's reply to the last user turn; the state always holds the partial reply."""
        session = sessions.get(request.session_hash if request else "default")
        session.system_prompt, gen = settings(system, temperature, top_p, max_tokens)
        messages, paths, keys = to_engine(turns)
        session.sync(messages, paths, keys)
        notices_before = len(session.notices)
        turns = turns + [assistant_turn("")]
        try:
            for delta in engine.stream_chat(session, gen):
                turns[-1] = assistant_turn(turns[-1]["text"] + delta)
                yield to_chatbot(turns), turns
        except (ConversationError, ImageError, ValueError) as e:
            turns.pop()
            raise gr.Error(str(e)) from None
        if len(session.notices) > notices_before:
            gr.Warning(session.notices[-1])
        yield to_chatbot(turns), turns

    def respond(message, turns, system, temperature, top_p, max_tokens, request: gr.Request):
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            raise gr.Error("Empty message: type a question or attach an image.")
        for path in files:
            try:
                check_upload(path, max_bytes)
            except ImageError as e:  # the message stays in the box; the chat goes on
                raise gr.Error(f"Cannot use this image: {e}") from None
        turns = list(turns or []) + [user_turn(text, files)]
        yield gr.MultimodalTextbox(value=None), to_chatbot(turns), turns
        for chat, new_turns in generate(turns, system, temperature, top_p, max_tokens, request):
            yield gr.MultimodalTextbox(value=None), chat, new_turns

    def retry(turns, system, temperature, top_p, max_tokens, request: gr.Request):
        turns = list(turns or [])
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if not turns:
            raise gr.Error("Nothing to retry yet.")
        yield from generate(turns, system, temperature, top_p, max_tokens, request)

    def undo(turns):
        """Remove the last exchange and put the question back in the box for editing."""
        turns = list(turns or [])
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if not turns:
            return gr.MultimodalTextbox(), to_chatbot(turns), turns
        last = turns.pop()
        return gr.MultimodalTextbox(value={"text": last["text"], "files": last["images"]}), to_chatbot(turns), turns

    def edit(turns, system, temperature, top_p, max_tokens, edit_data: gr.EditData, request: gr.Request):
        turns = list(turns or [])
        i = chatbot_index_to_turn(turns, edit_data.index)
        if turns[i]["role"] != "user":
            raise gr.Error("Only your own messages can be edited.")
        turns = turns[:i] + [user_turn(str(edit_data.value), turns[i]["images"])]
        yield from generate(turns, system, temperature, top_p, max_tokens, request)

    def clear(request: gr.Request):
        sessions.drop(request.session_hash if request else "default")
        return [], []

    with gr.Blocks(title="Vision Assistant", fill_height=True) as demo:
        gr.Markdown(f"### Vision Assistant\nModel: `{config.llm}` + {config.vision.model_type} vision tower, "
                    f"{config.projector.type} projector. {banner}")
        turns = gr.State([])
        chatbot = gr.Chatbot(label="Chat", height=480, editable="user", buttons=["copy"], scale=1)
        box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False,
                                   placeholder="Ask about an image: attach one or more, or just chat", sources=["upload"])
        with gr.Row():
            stop_btn = gr.Button("Stop", variant="stop", size="sm")
            retry_btn = gr.Button("Retry", size="sm")
            undo_btn = gr.Button("Undo", size="sm")
            clear_btn = gr.Button("Clear", size="sm")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt", placeholder="(the model's default)", lines=2)
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            max_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
        knobs = [system, temperature, top_p, max_tokens]
        gr.Examples(examples=[[{"text": q, "files": [str(EXAMPLES_DIR / f)]}] for f, q in EXAMPLES], inputs=[box],
                    label="Examples (the default model knows simple shapes and colours; try a photo to see its limits)")
        chat_event = box.submit(respond, [box, turns, *knobs], [box, chatbot, turns], api_name="chat")
        retry_event = retry_btn.click(retry, [turns, *knobs], [chatbot, turns], api_name="retry")
        edit_event = chatbot.edit(edit, [turns, *knobs], [chatbot, turns], api_name=False)
        undo_btn.click(undo, [turns], [box, chatbot, turns], api_name="undo")
        clear_btn.click(clear, None, [chatbot, turns], api_name="clear")
        stop_btn.click(None, None, None, cancels=[chat_event, retry_event, edit_event], api_name=False)
    return demo

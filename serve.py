"""python serve.py [--model SPEC] [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] ...

A Gradio multimodal chat at / and an OpenAI-compatible API at /v1 on the same server, over one
engine. Binds to 127.0.0.1 unless told otherwise; a public share link only with --share."""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python serve.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="default",
                   help="model spec: 'default' (bundled, offline), one of our checkpoints, a llava-hf or BLIP-2 "
                        "directory, or a hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=os.environ.get("VISION_ASSISTANT_AUTH"),
                   help="USER:PASS for the UI (or env VISION_ASSISTANT_AUTH); the API then needs 'Bearer PASS'")
    p.add_argument("--max-image-mb", type=float, default=10, help="largest accepted image upload")
    p.add_argument("--concurrency", type=int, default=1, help="replies generated at the same time")
    # assistant.cpu.policy.QUANTIZE_HELP's words: importing it would load torch before --help answers
    p.add_argument("--quantize", default="auto",
                   help="LLM weights: auto (int8 on a CPU, full precision on a GPU), none (full precision), int8 "
                        "(smoothed int8 on the CPU: faster, answers can differ slightly from full precision), "
                        "4bit / 8bit (bitsandbytes)")
    p.add_argument("--no-compile", action="store_true",
                   help="with int8: keep the eager decode steps instead of compiling faster ones in the "
                        "background")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let the API fetch http(s) image URLs (off: only data: URLs)")
    p.add_argument("--share", action="store_true", help="also create a public Gradio share link (UI only)")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' warnings and progress bars")
    return p.parse_args(argv)


def build_app(engine, args):
    import gradio as gr
    from fastapi import FastAPI

    from server.image_store import ImageStore
    from server.openai_api import build_router
    from server.ui import build_ui

    auth = None
    if args.auth:
        if ":" not in args.auth:
            raise SystemExit("error: --auth must look like USER:PASS")
        auth = tuple(args.auth.split(":", 1))
    store = ImageStore()
    demo = build_ui(engine, max_image_mb=args.max_image_mb, store=store, concurrency=args.concurrency)
    demo.queue(default_concurrency_limit=args.concurrency)
    app = FastAPI(title="Vision Assistant")
    app.include_router(build_router(engine, args.model_name, max_image_mb=args.max_image_mb,
                                    allow_remote_images=args.allow_remote_images, concurrency=args.concurrency,
                                    api_key=auth[1] if auth else None))
    app = gr.mount_gradio_app(app, demo, path="/", auth=auth, allowed_paths=[str(store.folder)])
    return app, demo, store


def compile_decode_steps(decoder) -> None:
    """Start compiling the decode steps in the background, and say so on stderr, and when they are ready."""
    if decoder is None:
        return
    import threading

    decoder.start(yield_to_replies=True)  # a person waits on each reply: the compile pauses for them

    print("note: the chat is ready and gets faster in the background (compiling its decode steps: a couple of "
          "minutes the first time, less later)", file=sys.stderr, flush=True)

    def report():
        if decoder.wait():
            print(f"note: faster replies ready (decode steps compiled in {decoder.compile_seconds:.0f} s)",
                  file=sys.stderr, flush=True)
        else:
            print(f"note: replies stay at their first speed ({decoder.error})", file=sys.stderr, flush=True)

    threading.Thread(target=report, daemon=True).start()


def main(argv=None) -> int:
    args = parse_args(argv)
    from assistant.console import setup_logging

    setup_logging(args.verbose)
    from assistant.inference.engine import Engine
    from assistant.cpu.policy import resolve_quantize
    from assistant.weights.loading import ModelSpecError, load_for_inference

    try:
        resolve_quantize(args.quantize)
    except ValueError as e:
        print(f"error: --quantize: {e}", file=sys.stderr)
        return 2
    from server.engine_thread import EngineThread

    def load():  # on the engine thread, which then computes every reply (engine_thread.py says why)
        model, processor, runtime = load_for_inference(args.model, quantize=args.quantize,
                                                       compile_decode=False if args.no_compile else "deferred")
        return Engine(model, processor, runtime)

    try:
        engine = EngineThread(load)
    except (ModelSpecError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    model = engine.model
    args.model_name = "default" if args.model == "default" else os.path.basename(os.path.normpath(args.model))
    if not model.config.trained:
        print(f"note: {model.config.description}", file=sys.stderr)
    app, demo, store = build_app(engine, args)
    if args.share:
        compile_decode_steps(engine.runtime.decoder)
        demo.launch(server_name=args.host, server_port=args.port, share=True, allowed_paths=[str(store.folder)],
                    auth=tuple(args.auth.split(":", 1)) if args.auth else None)
        return 0
    import uvicorn

    print(f"chat UI: http://{args.host}:{args.port}/   OpenAI API: http://{args.host}:{args.port}/v1", flush=True)
    # only now: compiling beside building the app made the server take 60 s to come up instead of 14
    compile_decode_steps(engine.runtime.decoder)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The web server behind `serve.py`: a Gradio chat UI and an OpenAI-compatible API, both thin
adapters over `assistant.inference.engine`."""

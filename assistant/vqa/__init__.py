"""Scripted VQA: `python -m assistant.vqa run ...` answers a questions file (resumable, batched);
`python -m assistant.vqa score ...` scores anyone's answers with the official VQAv2 metric."""

"""Fine-tuning: LLaVA-format data in, a checkpoint `serve.py` and `assistant.vqa` load directly."""

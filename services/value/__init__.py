"""The value service: a FastAPI gateway in front of vLLM's pooling runner (``/classify``)."""

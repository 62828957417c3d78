"""The policy service: a FastAPI gateway in front of vLLM's OpenAI-compatible server (generation)."""

"""What a vLLM gateway adds to the common service parts: the vLLM child process, the swap gate, checkpoint
validation, the hot-swap sequence (:class:`services.gateway.vllm_gateway.VLLMGateway`), the gateway app builder
and settings. ``services.policy`` and ``services.value`` are built on it."""

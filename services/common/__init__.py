"""Code shared by the policy and value services: settings, vLLM child process, auth, checkpoints, hot-swap,
metrics, logging and the HTTP client base."""

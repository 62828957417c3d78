"""Network services around the `cpl` library: thin adapters, no algorithm (docs/architecture.md).

``services.policy`` and ``services.value`` are FastAPI gateways in front of a vLLM OpenAI-compatible server
that each runs as a child process on localhost (``services.gateway`` holds what they share);
``services.search`` is the search API and its Celery workers. ``services.common`` holds what every service
shares (app factory, errors, settings mixins, auth, the HTTP client base).
"""

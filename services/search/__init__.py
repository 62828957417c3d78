"""The search service: a REST API (``cpl serve search``) that queues plan-tree searches, Celery workers
(``cpl worker``) that build the trees with :class:`cpl.mcts.MCTS` against the policy and value services, and a
Redis store holding records, tree snapshots and event streams. docs/search-service.md describes it."""

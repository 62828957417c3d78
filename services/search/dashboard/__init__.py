"""The search service's dashboard: server-rendered pages at ``/`` of the search API and one small vendored script
that reads only the public ``/v1`` API with the key the user types (kept in ``sessionStorage``).

Mounted by the search app with one line, ``app.include_router(dashboard_router())``; docs/search-service.md.
"""

from services.search.dashboard.routes import dashboard_router

__all__ = ["dashboard_router"]

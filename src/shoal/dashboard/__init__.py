"""The dashboard: a page served at `/` and the live event stream it reads.

    activity.py   recent requests and pulls, folded from events (pure, no I/O)
    stream.py     `GET /shoal/v1/events`: a snapshot of the views, then what changes (SSE)
    pages.py      the page and its files (`static/`), with headers that keep it to itself

The page uses the node's own JSON API only, as any client would; see `static/app.js`.
"""

from __future__ import annotations

from shoal.dashboard.stream import DASHBOARD, Dashboard, install

__all__ = ["DASHBOARD", "Dashboard", "install"]

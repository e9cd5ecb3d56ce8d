"""Serving: an OpenAI-compatible HTTP API (api.py) over a continuous-batching engine
(batching.py), and a chat page (page.html)."""

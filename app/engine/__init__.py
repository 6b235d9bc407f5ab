"""The catalog side of the backup engine: chains, outcomes, retention, reaping, fetching chains.

Core code: used by the worker's jobs and by the services, never importing the HTTP edge
(FastAPI, routers, API schemas); import-linter holds this (see docs/ARCHITECTURE.md).
"""

"""The REST front end (FastAPI). Speaks HTTP only; never imports torch or the engine."""

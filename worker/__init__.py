"""Celery workers: each runs one ERQ job at a time (one worker per GPU)."""

"""Celery side of the dispatcher: the app, its queues and routing, and thin tasks."""

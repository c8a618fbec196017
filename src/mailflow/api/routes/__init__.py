"""API room: one router per service; app.py includes them all under /api/v1."""

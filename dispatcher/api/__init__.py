"""The HTTP API: ``app.create_api`` joins a router per resource, auth and problem answers."""

"""Tooling for the local stack (``dispatcher run``, the demo, a .eml SMTP server); production
code never imports it."""

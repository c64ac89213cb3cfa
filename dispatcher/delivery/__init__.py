"""Delivery: the send lifecycle, rendering, MIME, transports, relay guard, suppression and
unsubscribe."""

"""Relays' webhooks about emails already sent: signature checks and their events as reports."""

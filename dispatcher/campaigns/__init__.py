"""Campaigns: create, reserve and control; Command Email chunks; the MailChimp job."""

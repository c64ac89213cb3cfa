"""Queue and task names every process agrees on (producers publish by name, workers consume)."""

from __future__ import annotations

#: Queue names; each has its own worker pool so SmartPlan sends never wait behind a campaign.
SMARTPLAN = "smartplan"
CAMPAIGN = "campaign"
SYSTEM = "system"
QUEUES = (SMARTPLAN, CAMPAIGN, SYSTEM)

SEND_SMARTPLAN_TASK = "dispatcher.send_smartplan"
SEND_SMARTPLAN_BATCH_TASK = "dispatcher.send_smartplan_batch"
SEND_SYSTEM_EMAIL_TASK = "dispatcher.send_system_email"
SEND_CAMPAIGN_CHUNK_TASK = "dispatcher.send_campaign_chunk"
RENEW_DUE_TASK = "dispatcher.renew_due"
SWEEP_OUTBOX_TASK = "dispatcher.sweep_outbox"
PUSH_EVENTS_TASK = "dispatcher.push_events"
START_SCHEDULED_TASK = "dispatcher.start_scheduled"

#: The header of a task we publish that says when (wall clock, Unix seconds).
PUBLISHED_AT = "published_at"

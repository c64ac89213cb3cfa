"""Command Email dispatcher: credits-aware email sending for SmartPlan steps and campaigns."""

from __future__ import annotations

__version__ = "0.1.0"

"""Tests of dispatcher/campaigns."""

"""Tests of dispatcher/cli."""

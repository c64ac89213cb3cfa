"""Tests of dispatcher/api."""

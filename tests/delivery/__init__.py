"""Tests of dispatcher/delivery."""

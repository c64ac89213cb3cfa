"""Tests of dispatcher/credits."""

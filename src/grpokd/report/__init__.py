"""Aggregate finished runs (results.json files) into tables."""

"""Converters from real public data sets into the event contract."""

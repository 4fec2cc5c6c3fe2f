"""Shared fixtures. Embedded broker/ClickHouse fixtures live in tests/fixtures_stack.py (imported below)."""

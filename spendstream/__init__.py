"""Spendstream shared core: settings, contracts, topics, pricing, CLI, embedded dev stack."""

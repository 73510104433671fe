"""Vendor HTTP clients shared by infra (providers, tools) and the trainer (stopping its own machine)."""

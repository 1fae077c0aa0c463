"""Wiring: the Definitions, resources, config, checks and the persona CLI."""

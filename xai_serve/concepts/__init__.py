"""Concept-level and global explanations: TCAV, Network Dissection and feature visualisation,
and the procedural concept library they probe with (generated from a seed, no downloads)."""

from __future__ import annotations

__all__: list[str] = []

"""Pseudo-mask sources: one interface (base.VideoInput -> per-annotation masks), one registry."""

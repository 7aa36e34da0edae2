"""The VIS model and the pseudo-mask sources."""

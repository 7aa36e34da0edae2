"""One module per user command; each is thin: parse arguments, call platform/models, report."""

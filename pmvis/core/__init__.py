"""What every layer needs and nothing else: the error type, typed-config base and overrides,
atomic file io, mask RLE helpers, device checks. Imports nothing else from pmvis."""

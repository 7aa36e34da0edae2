"""Ray Tune search spaces as YAML files (package data)."""

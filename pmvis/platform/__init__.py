"""Ray + MLflow glue, configs, storage, YTVIS I/O and evaluation."""

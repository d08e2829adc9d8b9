"""Worker side of the fleet: adapters, model cache, models, tasks, batching."""

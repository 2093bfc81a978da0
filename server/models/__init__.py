"""Which model versions serve (repository.py: leases, hot reload, verification) and each model's own settings
(model_settings.py)."""

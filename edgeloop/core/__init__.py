"""The shared runtime every service stands on: errors, settings, logs, metrics, runner."""

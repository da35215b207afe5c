"""The operator console: pages of ours inside the Django admin, live consumers, health and metrics."""

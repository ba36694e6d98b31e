"""What an operator runs and sees: the service loop (signals, systemd, drain),
workers, the admin listener."""

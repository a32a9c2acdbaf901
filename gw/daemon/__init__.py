"""The daemon: the process, the HTTP API, its token, metrics and logs."""

"""The durable store of exposures: the `Store` protocol and its TinyDB implementation."""

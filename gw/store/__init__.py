"""The durable store of exposures."""

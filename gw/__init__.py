"""The Oakestra gateway: exposes services of an Oakestra cluster to the Internet via nftables."""

__version__ = "0.1.0"

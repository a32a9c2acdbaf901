"""The namespace lab and the demo that runs in it (not used by the daemon)."""

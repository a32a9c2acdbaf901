"""The gateway service: the one door to the store and the firewall."""

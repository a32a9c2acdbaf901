"""Adapters to the kernel: the libnftables session and the firewall over it, conntrack,
netlink (pyroute2), the drift watcher and the listening sockets."""

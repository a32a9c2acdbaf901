"""The namespace lab and the demo that runs in it (not used by the daemon), and the harness
the tests build on: namespaces and veth pairs (`netns`), the real daemon in a namespace
(`daemon`), an HTTP client bound to a namespace (`http`), the three-namespace lab
(`topology`), probes of its data path (`probes`) and the services it runs (`services`).

The names below are the lab's public ones, so that ``from gw import lab`` is all a test or
the demo imports."""

from .daemon import API_PORT, GatewayDaemon, gateway_command, toml
from .http import NetnsHttp, Response, in_netns
from .netns import (LabError, Netns, enter, inside, kill_namespace_processes, netns, ns_path,
                    run, stop_process, veth)
from .probes import (UdpFlow, family_of, http_get, http_post, tcp_connect, tcp_echo,
                     udp_exchange)
from .topology import (CLIENT_V4, CLIENT_V6, CONTAINER_SUBNETS, CONTAINER_V4, CONTAINER_V6,
                       ECHO_PORT, GATEWAY_V4, GATEWAY_V6, HTTP_PORT, INTERNAL_V4, INTERNAL_V6,
                       LAB_ROOT, LAB_TOKEN, PREFIX, ROLES, SERVICE_RANGES, SERVICE_V4,
                       SERVICE_V6, TUNNEL_MTU, UDP_PORT, Lab, lab_daemon, list_labs,
                       remove_tag)

__all__ = [
    "API_PORT", "GatewayDaemon", "gateway_command", "toml",
    "NetnsHttp", "Response", "in_netns",
    "LabError", "Netns", "enter", "inside", "kill_namespace_processes", "netns", "ns_path",
    "run", "stop_process", "veth",
    "UdpFlow", "family_of", "http_get", "http_post", "tcp_connect", "tcp_echo", "udp_exchange",
    "CLIENT_V4", "CLIENT_V6", "CONTAINER_SUBNETS", "CONTAINER_V4", "CONTAINER_V6", "ECHO_PORT",
    "GATEWAY_V4", "GATEWAY_V6", "HTTP_PORT", "INTERNAL_V4", "INTERNAL_V6", "LAB_ROOT",
    "LAB_TOKEN", "PREFIX", "ROLES", "SERVICE_RANGES", "SERVICE_V4", "SERVICE_V6", "TUNNEL_MTU",
    "UDP_PORT", "Lab", "lab_daemon", "list_labs", "remove_tag",
]

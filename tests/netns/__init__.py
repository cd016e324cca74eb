"""A real LAN on one machine: network namespaces, a bridge, mDNS, netem (DESIGN.md §10)."""

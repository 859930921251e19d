"""Cluster-level description of a deployment: layouts of E/P/D instances and their devices."""

from epd.cluster.layout import InstanceSpec, Layout, Role, parse_devices

__all__ = ["InstanceSpec", "Layout", "Role", "parse_devices"]

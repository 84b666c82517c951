"""l4lb: a layer-4 load balancer with an XDP fast path."""

__version__ = "0.1.0"

"""mirror: a pull-through caching proxy for Docker/OCI registries."""

__version__ = "0.1.0"

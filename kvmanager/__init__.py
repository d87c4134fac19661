"""TinyServe Cluster: kvmanager."""

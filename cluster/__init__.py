"""TinyServe Cluster: cluster."""

"""TinyServe Cluster: replicas."""

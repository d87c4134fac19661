"""TinyServe Cluster: protos."""

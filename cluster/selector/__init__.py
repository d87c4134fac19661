"""The cache-selection gRPC service: index, objective, policies, servicer, client."""

"""TinyServe Cluster: cuda_kernels."""

"""TinyServe benchmarks: workload generators, the cluster simulator, the routing benchmark,
the weight sweep and the HTTP load generator. Benchmarks may import any package; no package
imports ``benchmarks``."""

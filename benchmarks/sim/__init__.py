"""Discrete-event cluster simulator: replicas with REAL kvmanager pools, a calibrated step-time
model, and routing by the real ``cluster`` selection core in process."""

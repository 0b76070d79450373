"""A run's plan and its stages on Ray: inputs, head training (Ray Train), the evaluation's
workers and shards, sweeps (Ray Tune), and the checks of devices, resources and nodes that
come before anything starts (docs/architecture.md walks through them)."""

"""The instrument: timing (``benchmark.TimingPolicy``), stage measurements, FLOPs, profiles, ceilings,
fidelity, fresh processes, the results store and queries over its records."""

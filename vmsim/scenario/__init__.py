"""Scripted scenarios: a topology, timed or sequenced steps against the live run (requests,
host-side changes, faults, process kills), and the outcomes they must have."""

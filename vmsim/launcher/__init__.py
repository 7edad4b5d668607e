"""The launcher: reads a topology, creates the run's objects, spawns the host and one guest
per VM, watches them, stops them, reports, and removes everything however the run ends.

    topology.py     the topology file: schema, defaults, readable errors
    defaults.py     the built-in default topology
    spec.py         turns a topology into the host's and guests' run specs (stats records)
    run.py          the run's lifecycle
    summary.py      the end-of-run summary (text and JSON)
"""

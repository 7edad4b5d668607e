"""`vmsim bench`: vmsim's data path measured against what a user would use instead, in the
same run (ratios are taken within a round: the machine is shared and noisy).

    baseline_pipe.py   the same block requests over multiprocessing.Pipe + msgpack
    cpu.py             how much parallelism two processes get right now
    runner.py          the cases, rounds, table and JSON
"""

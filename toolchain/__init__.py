"""Ingest, analysis, compression passes, reports and the CLI of datafree.

Importing this package (every entry point does, before torch loads) caps how long
OpenMP worker threads spin before they sleep.  The fitting passes run thousands of
small torch ops; with libgomp's default spin (300,000 rounds) each one's barrier
waits on a thread that another program has taken the core from.  Measured on 2
cores, compressing ResNet-20 (30 % + W4A8, 100 joint steps, cached images) with
300,000 / 1,000 rounds: idle machine 24 / 28 s; with two other busy threads over
12 min / 131 s (libgomp itself drops to 1,000 only when it has more threads than
cores).  A value the user set wins.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

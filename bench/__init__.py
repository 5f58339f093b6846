"""fusedloss benchmarks: ``python -m bench`` (see ``python -m bench --help``).

Layout
------
``bench/__main__.py``        the command line: picks cases, runs workers, prints tables,
                             writes JSON/PNG
``bench/_harness.py``        shared machinery: case/provider model, timing, memory, checks,
                             tables, plots
``bench/_worker.py``         the process that measures one case for one (or, with --quick, several)
                             providers, forked from a server that has imported torch
                             (``python -m bench._worker --zygote``) or started as
                             ``python -m bench._worker SPEC.json`` (--no-fork)
``bench/bench_<loss>.py``    one file per loss: its cases and providers
                             (see ``bench_cross_entropy.py``)

Adding a loss: create ``bench/bench_<loss>.py`` defining ``LOSS``, ``PROVIDERS``, ``cases()``,
``make_inputs()`` and ``make_runner()``; it is discovered automatically (``_harness.loss_modules``).
"""

"""``python kernels/bench.py [options]``: the fused loss kernels' benchmark, kept at the path the
product documents; the benchmark itself lives with the others in ``dhkd_pipe.benchmarks.kernels``
(``--help`` lists its options)."""

from dhkd_pipe.benchmarks.kernels import main

if __name__ == "__main__":
    main()

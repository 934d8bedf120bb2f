"""Benchmarks: a model's speed and memory under each precision, compilation and memory option; data loading; DDP.

    configs.py       the named setups (tiny, small, fdm32, carla) and the variants that change one thing
    probes.py        what the machine offers: autocast dtypes, a compiler, device name, peak FLOP/s
    memory.py        peak memory growth of one call (CUDA allocator, or the CPU's resident set)
    workload.py      the shared weights, training batch and training-step FLOPs every variant runs on
    runner.py        Runner: one variant's models and its timed calls
    run.py           run_benchmark: every variant in one process, interleaved repetitions, the result dict
    tables.py        the result as a markdown table and .json / .md files
    cache.py         the key/value cache's speed-up per window size (benchmark.py --cache_windows)
    data_loading.py  how long training waits for data: an mp4 folder against its shard cache (bench_data.py)
    ddp.py           per-step training time on 1 and more ranks under mpiexec (bench_ddp.py)
"""

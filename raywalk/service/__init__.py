"""The Ray service around the science: corpus build, dataset, the driver, the worker, sweeps and Tune."""

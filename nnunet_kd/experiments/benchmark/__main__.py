"""``python -m nnunet_kd.experiments.benchmark``: the same command as ``nnunet_kd_benchmark``."""
from nnunet_kd.experiments.benchmark.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

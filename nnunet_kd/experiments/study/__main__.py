"""``python -m nnunet_kd.experiments.study``: the same command as ``nnunet_kd_study``."""
from nnunet_kd.experiments.study.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Convert a BraTS release or the Decathlon Task01 to an nnU-Net v2 raw dataset.

Thin wrapper around ``nnunet_kd.conversion.cli`` (also installed as ``nnunet_kd_convert_brats``);
run ``python dataset_conversion/convert_brats.py -h`` for the options.
"""
from nnunet_kd.conversion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

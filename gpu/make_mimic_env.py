"""A Python environment here that looks, to nnU-Net and nnunet_kd, like the lent GPU machine's: for rehearsing
gpu/run_on_gpu.sh on the CPU.

The machine's ``python3`` holds the packages in ``gpu/h200_packages.txt`` (read off KINDS.md) and none of
nnU-Net's stack. This makes ``VENV`` (a virtual environment without this machine's site-packages) whose only
other packages are links to those distributions of ``--from-site`` (this project's .venv) that the list names:
torch, numpy, scipy, ... but not nibabel, SimpleITK, blosc2, MedPy or nnunetv2. gpu/run_on_gpu.sh then installs
the carried wheels (their cp311 builds, here) into a --target folder, exactly as it does there.

    python gpu/make_mimic_env.py /tmp/mimic/venv
    PY=/tmp/mimic/venv/bin/python WHL=/tmp/whl311 ... bash gpu/run_on_gpu.sh OUT
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("venv", type=Path)
    p.add_argument("--from-site", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    p.add_argument("--packages", type=Path, default=Path(__file__).with_name("h200_packages.txt"))
    p.add_argument("--also", nargs="*",
                   default=["pytz", "tzdata", "importlib-resources", "httpcore2", "httpx2", "h2", "hpack", "hyperframe",
                            "truststore"],
                   help="further distributions to link: what this machine's versions of listed packages need "
                        "(pandas 2.x: pytz, tzdata; nibabel on Python < 3.12: importlib-resources; this "
                        "huggingface_hub: httpx2 and its helpers); the GPU machine has its own versions")
    args = p.parse_args()
    wanted = {_normal(n) for n in args.packages.read_text().split() + list(args.also) if n.strip()}
    if args.venv.exists():
        print(f"error: {args.venv} exists; remove it first", file=sys.stderr)
        return 1
    subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
    base = args.venv / "gpu_base_packages"
    base.mkdir()
    linked, skipped = [], []
    for dist in metadata.distributions(path=[str(args.from_site)]):
        name = _normal(dist.metadata["Name"])
        if name not in wanted:
            skipped.append(name)
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in sorted(tops):
            source = args.from_site / top
            if source.exists() and not (base / top).exists():
                (base / top).symlink_to(source)
        linked.append(name)
    site = Path(subprocess.run([str(args.venv / "bin" / "python"), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "gpu_base_packages.pth").write_text(str(base.resolve()) + "\n")
    print(f"{args.venv}: {len(linked)} distributions linked from {args.from_site}; left out: "
          f"{', '.join(sorted(skipped))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

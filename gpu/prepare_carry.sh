#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what gpu/run_on_gpu.sh needs on the lent GPU machine, in two ignored folders
# of the repository that the device call carries:
#
#   .whl/       the wheels of what that machine lacks (nnunetv2 2.8.1 and its stack, without SimpleITK:
#               gpu/sitk_shim stands in for it), for CPython $PYVER on manylinux x86-64, one version each;
#               acvl-utils and MedPy exist only as sdists: built here into pure-Python wheels (pip wheel --no-deps)
#   .gpu_data/  BraTS2018_2mm (the 33 real cases at 2 mm), copied from ../shared/data
#
# and prints each wheel's Requires-Dist that neither the carried wheels nor that machine's packages
# (gpu/h200_packages.txt) provide, and the size of everything that travels (limit 64 MiB).
#
#     bash gpu/prepare_carry.sh                                   # for the GPU machine (Python 3.12)
#     PYVER=3.11 DEST=/tmp/whl311 NO_DATA=1 ALSO_THERE=importlib-resources bash gpu/prepare_carry.sh
#                                                 # the CPU rehearsal's cp311 builds (gpu/README.md)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${PY:=$REPO/.venv/bin/python}" "${PYVER:=3.12}" "${DEST:=$REPO/.whl}"
: "${DATA_SRC:=$REPO/../shared/data/BraTS2018_2mm}"
: "${NO_DATA:=0}" "${ALSO_THERE:=}"  # ALSO_THERE: more packages the target has (the rehearsal's mimic)
# The versions of this project's .venv (tested together here).
BINARY="nnunetv2==2.8.1 dynamic_network_architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6
        blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 nibabel==5.4.2 yacs==0.1.8 graphviz==0.21
        connected-components-3d==3.29.0"
SDIST_ONLY="acvl_utils==0.2.6 MedPy==0.5.2"
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=" --platform $p"; done

. "$REPO/gpu/fresh_dir.sh"
fresh_dir "$DEST" || exit 1
for spec in $BINARY; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        $PLATFORMS -d "$DEST" "$spec" 2>&1 | grep -v "is ignored" || true
done
# pure Python sdists: a py3-none-any wheel, built here
"$PY" -m pip wheel -q --no-deps -w "$DEST" $SDIST_ONLY 2>&1 | grep -v "is ignored" || true
for w in "$DEST"/*.whl; do
    case "$(basename "$w")" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
        *-cp${PYVER/./}-*manylinux*x86_64*.whl|*-abi3-manylinux*x86_64*.whl) ;;
        *) echo "error: $w is not a wheel for CPython $PYVER manylinux x86-64" >&2; exit 1 ;;
    esac
done
n_expected=$(( $(echo $BINARY | wc -w) + $(echo $SDIST_ONLY | wc -w) ))
n=$(ls "$DEST"/*.whl | wc -l)
names=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort)
if [ "$n" != "$n_expected" ] || [ -n "$(echo "$names" | uniq -d)" ]; then
    echo "error: $n wheels in $DEST, expected $n_expected, one per package:" >&2; ls "$DEST" >&2; exit 1
fi

# Requires-Dist that nothing provides there (extras and markers that do not apply are skipped)
"$PY" - "$DEST" "$REPO/gpu/h200_packages.txt" "$PYVER" "$ALSO_THERE" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement
dest, listed, pyver = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(n) for n in listed.read_text().split() + sys.argv[4].split()}
carried = {norm(w.name.split("-")[0]) for w in dest.glob("*.whl")}
env = {**default_environment(), "python_version": pyver, "python_full_version": pyver + ".0", "extra": ""}
# not carried on purpose (gpu/README.md): SimpleITK is replaced by gpu/sitk_shim; nothing that runs there imports
# the others (batchgenerators' py2 helpers, blosc2's CTable/schema modules, nnunetv2's tifffile codecs)
not_carried = {"simpleitk": "gpu/sitk_shim stands in", "future": "not imported", "unittest2": "not imported",
               "pydantic": "blosc2 CTable only, not imported", "imagecodecs": "not imported"}
missing = []
for w in sorted(dest.glob("*.whl")):
    meta = next(n for n in zipfile.ZipFile(w).namelist() if n.endswith(".dist-info/METADATA"))
    for line in zipfile.ZipFile(w).read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = norm(req.name)
        if name not in have | carried:
            missing.append(f"{w.name.split('-')[0]} needs {req} ({not_carried.get(name, 'MISSING')})")
print("\n".join(missing) or "every Requires-Dist is provided")
if any(m.endswith("MISSING)") for m in missing):
    sys.exit("error: a requirement is missing on the GPU machine")
EOF

if [ "$NO_DATA" != 1 ]; then
    fresh_dir "$REPO/.gpu_data" || exit 1
    cp -r "$DATA_SRC" "$REPO/.gpu_data/BraTS2018_2mm"
    test "$(ls -d "$REPO/.gpu_data/BraTS2018_2mm"/Brats18_* | wc -l)" = 33
fi
cd "$REPO"
if ! { git check-ignore -q .whl/x && git check-ignore -q .gpu_data/x; }; then
    echo "error: .whl/ and .gpu_data/ must be ignored (.gitignore)" >&2; exit 1
fi
tracked=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- | tail -1 |
           cut -f1)
carried=$(du -cb .whl .gpu_data 2>/dev/null | tail -1 | cut -f1)
echo "travels: working tree $tracked B + carried .whl and .gpu_data $carried B = $(( tracked + carried )) B" \
     "($(( (tracked + carried) * 100 / 67108864 )) % of 64 MiB)"

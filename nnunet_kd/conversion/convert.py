"""Convert any BraTS release (2018-2025) or the Decathlon Task01 to an nnU-Net v2 raw dataset.

Output: ``$nnUNet_raw/DatasetXXX_NAME`` with channels in the order T1, T1ce, T2, FLAIR (or a subset,
renumbered from 0) and labels in nnU-Net's BraTS convention (1 ED, 2 NCR/NET, 3 ET), trained as the
regions whole tumour / tumour core / enhancing tumour. Images keep their voxels and geometry exactly.

Every case is validated (all files present, readable to the last voxel, same grid, allowed labels)
in worker processes while the dataset is built in a temporary folder next to the target; only when
all cases succeeded is that folder renamed into place, so a failure never leaves anything behind.
The workers stop by themselves when the converting process dies (even by SIGKILL), and the temporary
folder a killed run left (``.DatasetXXX_NAME.partial-PID@HOST-...``) is removed by the next run of the
same dataset id on the same host once process PID is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Iterable, List, Optional, Sequence, Tuple

from nnunet_kd.atomic import make_temp_dir
from nnunet_kd.brats import MODALITIES
from nnunet_kd.conversion.cases import CaseResult, run_case
from nnunet_kd.conversion.dataset_json import write_dataset_json
from nnunet_kd.conversion.discovery import CaseTask, assign_cohort, discover, resolve_modalities
from nnunet_kd.conversion.releases import (RELEASES, ConversionError, check_input_dir, detect_release, normalize_release,
                                           resolve_root, root_for_release)
from nnunet_kd.paths import dataset_folders


def _progress(iterable: Iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="case")


def _log(message: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _exit_with_parent(parent_pid: int, interval: float = 0.2) -> None:
    """Worker initializer: a daemon thread ends this worker once ``parent_pid`` is no longer its parent.

    A SIGKILLed parent runs no cleanup and its pool's workers would otherwise go on writing, then wait
    forever for more work; polling getppid (the orphan is re-parented) works on every POSIX system.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _partial_prefix(dataset_id: int) -> str:
    return f".Dataset{dataset_id:03d}_"


def _partial_owner_tag() -> str:
    return f"{os.getpid()}@{os.uname().nodename}"


def _remove_dead_partials(out_root: str, dataset_id: int) -> None:
    """Remove the partial folders of ``dataset_id`` that runs on this host left when they were killed."""
    pattern = re.compile(re.escape(_partial_prefix(dataset_id)) + r".*\.partial-(\d+)@(.+)-[0-9a-f]{12}")
    for name in sorted(os.listdir(out_root)):
        match = pattern.fullmatch(name)
        if not match or match.group(2) != os.uname().nodename or _pid_alive(int(match.group(1))):
            continue
        print(f"Removing {os.path.join(out_root, name)}, left by an interrupted conversion", file=sys.stderr)
        shutil.rmtree(os.path.join(out_root, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _run_all(tasks: List[CaseTask], num_processes: int, skip_incomplete: bool, progress: bool) -> List[CaseResult]:
    """Run every case; on the first failure (without skip_incomplete) cancel the rest and raise."""
    results: List[CaseResult] = []
    if num_processes <= 1 or len(tasks) <= 1:
        for task in _progress(tasks, len(tasks), progress, "converting"):
            results.append(run_case(task, skip_incomplete))
        return results
    with ProcessPoolExecutor(max_workers=min(num_processes, len(tasks)), initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(run_case, t, skip_incomplete) for t in tasks]
        bar = _progress(None, len(tasks), progress, "converting") if progress else None
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    exc = f.exception()
                    if exc is not None:
                        for p in pending:
                            p.cancel()
                        raise exc
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        results = [f.result() for f in futures]
    return results


def _output_root_path(output_root: Optional[str]) -> str:
    """``output_root`` or ``$nnUNet_raw`` (checked before any work; created only when writing)."""
    root = output_root or os.environ.get("nnUNet_raw")
    if not root:
        raise ConversionError("no output folder: set the nnUNet_raw environment variable or pass -o/--output-root")
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConversionError(f"output root {root} exists and is not a folder")
    return root


def _existing_datasets(out_root: str, dataset_id: int, overwrite: bool) -> List[str]:
    """The datasets with this id in ``out_root``; ConversionError if there is one and not ``overwrite``."""
    existing = dataset_folders(out_root, dataset_id)
    if existing and not overwrite:
        raise ConversionError(f"dataset folder {existing[0]} already exists for id {dataset_id}; "
                              "pass --overwrite to replace it")
    return existing


def _replace_datasets(built: str, target: str, existing: List[str], out_root: str) -> None:
    """Put ``built`` in place as ``target``, replacing ``existing``; on failure the old datasets stay."""
    # Move old datasets aside first so the new one goes in with a single rename.
    trash = []
    try:
        for old in existing:
            aside = make_temp_dir(out_root, f".{os.path.basename(old)}.old-")
            os.replace(old, os.path.join(aside, "d"))
            trash.append((old, aside))
        os.replace(built, target)
    except OSError:
        for old, aside in trash:  # put the previous dataset back
            os.replace(os.path.join(aside, "d"), old)
            os.rmdir(aside)
        raise
    for _, aside in trash:
        shutil.rmtree(aside, ignore_errors=True)


def _release_and_root(input_dir: str, year: Optional[str]) -> Tuple[str, str]:
    """(release, data root): detected from the layout (and reported) when ``year`` is None."""
    if year is None:
        release, root = resolve_root(input_dir)
        note = " (naming of every 2023-2025 cohort; the cohort and year follow)" if release == "brats2023" else ""
        print(f"Detected release: {release}{note} (from the layout of {root})")
        return release, root
    release = normalize_release(year)
    return release, root_for_release(release, input_dir)


def _find_tasks(release: str, root: str, input_dir: str, chosen: Tuple[str, ...]) -> List[CaseTask]:
    tasks = discover(release, root, chosen, "")
    if not tasks:
        hint = ""
        try:
            hint = f" (its layout looks like {detect_release(input_dir)})"
        except ConversionError:
            pass
        raise ConversionError(f"no {release} cases found in {root}{hint}")
    ids = [t.case_id for t in tasks]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConversionError(f"case ids found more than once: {', '.join(dupes)}")
    return tasks


def convert_brats(
    input_dir: str,
    dataset_id: int,
    name: Optional[str] = None,
    year: Optional[str] = None,
    modalities: Optional[Sequence[str]] = None,
    num_processes: int = min(4, os.cpu_count() or 1),
    overwrite: bool = False,
    skip_incomplete: bool = False,
    output_root: Optional[str] = None,
    progress: bool = False,
) -> str:
    """Convert a BraTS release (or the Decathlon Task01) to ``<output_root>/DatasetXXX_NAME``.

    ``year``: ``2018`` ... ``2024`` or ``msd`` (``brats2021`` style also accepted); detected from
    the layout when None. ``modalities``: subset to write (aliases allowed), renumbered from 0 in
    the order T1, T1ce, T2, FLAIR. ``output_root`` defaults to ``$nnUNet_raw``.
    Returns the dataset folder. Raises ConversionError on bad input, leaving nothing behind.
    """
    try:
        dataset_id = int(dataset_id)
    except (TypeError, ValueError):
        raise ConversionError(f"dataset id must be an integer, got {dataset_id!r}") from None
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be between 1 and 999, got {dataset_id}")
    chosen = resolve_modalities(modalities)
    out_root = _output_root_path(output_root)
    input_dir = check_input_dir(input_dir)
    release, root = _release_and_root(input_dir, year)
    tasks = _find_tasks(release, root, input_dir, chosen)
    folder_names = [os.path.basename(input_dir)] + os.path.relpath(root, input_dir).split(os.sep)
    cohort, chosen, release = assign_cohort(tasks, release, year is not None, folder_names, modalities)
    convention, default_name = RELEASES[release]
    if cohort is not None:
        print(f"Cohort: BraTS {cohort.key} ({cohort.title}); labels from {cohort.source}")
        default_name += "" if cohort.prefix == "GLI" else f"_{cohort.prefix}"
    if name is None:
        name = default_name if chosen in (MODALITIES, getattr(cohort, "modalities", None)) \
            else f"{default_name}_{'_'.join(chosen)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ConversionError(f"invalid dataset name {name!r}: use letters, digits, '_', '-' and '.'")

    os.makedirs(out_root, exist_ok=True)
    target = os.path.join(out_root, f"Dataset{dataset_id:03d}_{name}")
    _existing_datasets(out_root, dataset_id, overwrite)

    # Build next to the target (same filesystem, so the final rename is atomic).
    _remove_dead_partials(out_root, dataset_id)
    tmp = make_temp_dir(out_root, f"{_partial_prefix(dataset_id)}{name}.partial-{_partial_owner_tag()}-")
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            os.makedirs(os.path.join(tmp, sub))
        for t in tasks:
            t.out_dir = tmp
        results = _run_all(tasks, num_processes, skip_incomplete, progress)
        for r in results:
            for note in r.notes:
                _log(f"note: {note}", progress)
            if r.skipped:
                _log(f"warning: skipping {r.skipped}", progress)
        kept = [r for r in results if not r.skipped]
        if not kept:
            raise ConversionError(f"no valid cases in {root}: all {len(results)} were skipped")
        num_training = sum(not r.is_test for r in kept)
        if not os.listdir(os.path.join(tmp, "imagesTs")):
            os.rmdir(os.path.join(tmp, "imagesTs"))
        write_dataset_json(tmp, chosen, num_training, sum(r.is_test for r in kept), name, release, convention,
                           cohort)
        existing = _existing_datasets(out_root, dataset_id, overwrite)  # one may have appeared while we worked
        _replace_datasets(tmp, target, existing, out_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"Wrote {target}: {num_training} training cases, {len(kept) - num_training} test cases, "
          f"channels {', '.join(chosen)}")
    return target

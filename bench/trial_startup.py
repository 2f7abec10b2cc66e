"""Per-trial start-up: a trial's worker loading the study's data itself vs. mapping the copy the
driver put into Ray's object store.

    .venv/bin/python bench/trial_startup.py [--study lenet5-mnist] [--repeats 3]

Each measurement runs in a fresh Ray worker process (a task with max_calls=1, as a trial on a
new actor) and times `Workbench.open` (data, dense weights from a checkpoint, the traced graph)
and, separately, the data step alone. Needs the study's data under $AUTOPRUNE_DATA.

Measured (2 shared CPU cores, lenet5-mnist, 54,000 training images, 3 repeats, medians): the
data step 2,995 ms from disk vs 0.7 ms from the object store (after one 282 ms `ray.put` on the
driver); the whole `Workbench.open` 8,521 ms vs 5,556 ms (the rest: building and tracing the
model, loading the dense weights, evaluating them on validation and test).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench")


def main() -> None:
    import ray
    import torch

    from autoprune.data import load_dataset
    from autoprune.models import build_model
    from autoprune.orchestration.distributed import fetch_data, share_data
    from autoprune.study import load_study

    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="lenet5-mnist")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study = load_study(args.study)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    data = load_dataset(study.dataset, val_fraction=study.val_fraction, seed=0,
                        options=study.data_options)
    t0 = time.perf_counter()
    shared = share_data(data)
    put_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="autoprune-startup-"))
    dense = tmp / "dense.pt"
    info = data.info
    torch.save(build_model(study.model, info.num_classes, info.in_channels,
                           info.image_size).state_dict(), dense)

    @ray.remote(num_cpus=1, max_calls=1)
    def start(use_shared: bool, whole: bool) -> float:
        from autoprune.device import set_threads
        from autoprune.pipeline import Workbench

        set_threads(1)
        t = time.perf_counter()
        given = fetch_data(shared) if use_shared else None
        if whole:
            Workbench.open(study, tmp, seed=0, device="cpu", checkpoint=str(dense), data=given)
        elif given is None:
            load_dataset(study.dataset, val_fraction=study.val_fraction, seed=0,
                         options=study.data_options)
        return time.perf_counter() - t

    log.info(f"{args.study}: {data.train_size} train images; ray.put on the driver "
             f"{put_s * 1e3:.1f} ms (once per search)")
    for whole, what in ((False, "data only"), (True, "Workbench.open")):
        for use_shared, how in ((False, "load from disk"), (True, "object store")):
            times = [ray.get(start.remote(use_shared, whole)) for _ in range(args.repeats)]
            log.info(f"{what:15s} {how:15s} median {statistics.median(times) * 1e3:8.1f} ms "
                     f"(range {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})")
    ray.shutdown()


if __name__ == "__main__":
    main()

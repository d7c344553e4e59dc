"""Peak memory of the real service while it takes a large CT series from a real PACS over DICOMweb.

One command: starts Debian's Orthanc (DICOMweb plugin) on a free loopback port with a temporary storage directory,
uploads a synthetic CT series (``--slices`` slices of ``--size`` x ``--size`` 16-bit pixels, shuffled, plus the
second acquisition and the DERIVED image of the test series), starts the real service (``bentoml serve``, tiny
random-weight demo model) allow-listing that PACS, warms it up with a request for a 3-slice series (so imports and
first-use allocations are not counted), then sends the large series by its series URI and samples the server's
process-tree RSS every 20 ms until the answer arrives.

It prints the series size, what the service used (instances, sampled slices, bytes fetched), the server's RSS
before the request and at its peak, and the peak growth, next to what holding the whole series at full depth
would take (``slices x size^2 x 4`` bytes as float32). The service windows each slice to 8-bit RGB as it arrives
and drops its data set, so the growth should stay near ``85 x size^2 x 3`` bytes plus the processor's tensors.

    python bench/dicomweb_memory.py                 # 300 slices of 512 x 512 (the lead runs this, on a quiet machine)
    python bench/dicomweb_memory.py --slices 20     # a quick check that it works
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the main acquisition (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice (default 512)")
    parser.add_argument("--demo-dir", default=os.environ.get("MEDGEMMA_DEMO_DIR", ""), help="demo checkpoint cache")
    args = parser.parse_args()

    import httpx

    from medgemma.demo import ensure_checkpoint
    from tests import pacs
    from tests.conftest import bentoml_serve, wait_for_model

    lacking = pacs.missing()
    if lacking:
        sys.exit(f"needs {', '.join(lacking)}: {pacs.INSTALL}")
    with tempfile.TemporaryDirectory(prefix="medgemma-dicomweb-bench-") as tmp:
        work = Path(tmp)
        model = ensure_checkpoint("vlm", "tiny", root=Path(args.demo_dir) if args.demo_dir else work / "demo")
        with pacs.orthanc(work / "orthanc") as server:
            t0 = time.monotonic()
            ct = pacs.ct_series(slices=args.slices, size=args.size, seed=7)
            series_bytes = sum(len(f) for f in ct.files)
            for data in ct.files:
                server.upload(data)
            del ct.files[:]
            small = pacs.ct_series(slices=3, size=16, seed=8)  # for the warm-up: loads the DICOMweb code paths
            for data in small.files:
                server.upload(data)
            print(f"PACS:            {ct.found} instances ({series_bytes / 2**20:.1f} MiB) uploaded in "
                  f"{time.monotonic() - t0:.1f} s")  # fmt: skip
            env = {"MEDGEMMA_MODEL": str(model), "MEDGEMMA_DICOMWEB_URLS": server.dicomweb}
            with bentoml_serve(env, work) as srv:
                wait_for_model(srv.url, model.name)
                url = f"{srv.url}/{model.name}/v1/generate"
                small_url = f"{server.dicomweb}/studies/{small.study}/series/{small.series}"
                warm = httpx.post(
                    url, json={"text": "warm up", "image_dicom": {"dicom_source": small_url}, "max_new_tokens": 2},
                    timeout=120,
                )  # fmt: skip
                warm.raise_for_status()
                time.sleep(1.0)
                before = tree_rss(srv.proc.pid)
                peak = before
                done = threading.Event()

                def sample() -> None:
                    nonlocal peak
                    while not done.is_set():
                        peak = max(peak, tree_rss(srv.proc.pid))
                        time.sleep(0.02)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                started = time.monotonic()
                series_url = f"{server.dicomweb}/studies/{ct.study}/series/{ct.series}"
                r = httpx.post(
                    url,
                    json={
                        "text": "Summarise this CT.",
                        "image_dicom": {"dicom_source": series_url},
                        "max_new_tokens": 4,
                    },
                    timeout=600,
                )
                elapsed = time.monotonic() - started
                done.set()
                sampler.join()
                if r.status_code != 200:
                    sys.exit(f"request failed: HTTP {r.status_code} {r.text[:500]}")
                (report,) = r.json()["image_sources"]
                full_depth = args.slices * args.size * args.size * 4
                print(f"service used:    {report['instances_used']} of {report['instances_found']} instances, "
                      f"{report['slices_sampled']} slices sampled, {report['bytes_fetched'] / 2**20:.1f} MiB fetched, "
                      f"order {report['order_key']}")  # fmt: skip
                print(f"request:         {elapsed:.1f} s")
                print(f"server RSS:      before {before / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
                print(f"peak growth:     {(peak - before) / 2**20:.1f} MiB  (the whole series as float32 would be "
                      f"{full_depth / 2**20:.1f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()

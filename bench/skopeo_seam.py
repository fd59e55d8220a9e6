"""The worker's skopeo seam against a bare ``skopeo copy``: the same copy, outside any worker.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.skopeo_seam [--mib 150] [--runs 5]

Each run seeds two fresh single-layer images of ``--mib`` MiB (OCI layouts written here, nothing
pulled) into the stack's TLS registry, then copies one through ``worker.seams.skopeo.Skopeo.copy``
(its private call directory, policy, authfiles, cert dir, ``--digestfile``) and the other with
``bench.promote``'s bare ``skopeo copy --all --preserve-digests`` (an authfile and a fresh HOME),
each to a fresh repository of the stack's plain registry, in an order that alternates from run
to run. Fresh images, because skopeo's blob cache (root's, whatever HOME says) would otherwise
mount a blob it has seen instead of uploading it. One uncounted warm-up run. Prints the times;
asserts nothing.

Whether the seam itself costs anything: what the job adds around the copy (claims, logins,
digest checks) is measured by ``bench.promote``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.promote import Copier
from harness.stack import RegistryEndpoint as Endpoint
from harness.stack import Stack
from tests.support.oci import write_oci_layout
from worker.core.credentials import Credential, Secret
from worker.seams.registry_http import RegistryEndpoint
from worker.seams.skopeo import CopySource, RegistryAccess, Skopeo


def _access(endpoint: Endpoint, registry_id: int) -> RegistryAccess:
    ca = Path(endpoint.ca_file).read_text() if endpoint.ca_file else None
    return RegistryAccess(
        RegistryEndpoint(id=registry_id, url=endpoint.url, host=endpoint.host, ca_cert=ca),
        Credential(endpoint.user, Secret(endpoint.password), "secret"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=150, help="size of each image's one layer")
    parser.add_argument("--runs", type=int, default=5, help="counted runs, one copy each way")
    args = parser.parse_args()
    stack = Stack(dict(os.environ))
    tls, plain = stack.tls, stack.plain
    work = Path(tempfile.mkdtemp(prefix="bench-skopeo-seam-"))
    try:
        bare = Copier(work, tls, plain)

        def seeded() -> str:
            layout = work / f"layout-{uuid.uuid4().hex[:8]}"
            write_oci_layout(layout, layer_bytes=args.mib * 1024 * 1024,
                             platforms=(("linux", "amd64"),))  # fmt: skip
            repository = f"bench-seam/src-{uuid.uuid4().hex[:8]}"
            bare.seed(layout, repository)
            shutil.rmtree(layout)
            return f"{tls.host}/{repository}:seed"

        source_access, dest_access = _access(tls, 1), _access(plain, 2)
        seam = Skopeo(timeout=600)
        times: dict[str, list[float]] = {"seam": [], "bare": []}
        for run in range(args.runs + 1):
            order = ("seam", "bare") if run % 2 == 0 else ("bare", "seam")
            sources = {way: seeded() for way in order}
            for way in order:
                target = f"{plain.host}/bench-seam/{way}-{uuid.uuid4().hex[:8]}:v1"
                if way == "seam":
                    started = time.perf_counter()
                    seam.copy(CopySource("docker", sources[way], source_access), target,
                              dest_access)  # fmt: skip
                    elapsed = time.perf_counter() - started
                else:
                    elapsed = bare.promote(sources[way], target)
                if run:
                    times[way].append(elapsed)
        for way, values in times.items():
            print(f"{way}: median {statistics.median(values):.3f} s, "
                  f"runs {', '.join(f'{v:.3f}' for v in values)}")  # fmt: skip
        ratios = [s / b for s, b in zip(times["seam"], times["bare"], strict=True)]
        print(
            f"seam / bare per run: {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"of medians {statistics.median(times['seam']) / statistics.median(times['bare']):.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The worker's skopeo seam against a bare ``skopeo copy``: the same copy, outside any worker.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.skopeo_seam [--mib 150] [--runs 5]

Each run seeds two fresh single-layer images of ``--mib`` MiB (OCI layouts written here, nothing
pulled) into the stack's TLS registry, then copies one through ``worker.seams.skopeo.Skopeo.copy``
(its private call directory, policy, authfiles, cert dir, ``--digestfile``) and the other with
a bare ``skopeo copy --all --preserve-digests`` (an authfile and a fresh HOME), each to a fresh
repository of the stack's plain registry, in an order that alternates from run to run. Fresh
images, because skopeo's blob cache (root's, whatever HOME says) would otherwise mount a blob it
has seen instead of uploading it. One uncounted warm-up run. Prints the times; asserts nothing.

Whether the seam itself costs anything: what the job adds around the copy (claims, logins,
digest checks) is measured by ``bench.promote``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.oci import write_oci_layout
from worker.core.credentials import Credential, Secret
from worker.seams.registry_http import RegistryEndpoint
from worker.seams.skopeo import CopySource, RegistryAccess, Skopeo

SKOPEO = "/usr/bin/skopeo"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=150, help="size of each image's one layer")
    parser.add_argument("--runs", type=int, default=5, help="counted runs, one copy each way")
    args = parser.parse_args()
    env = os.environ
    tls, plain = env["PUSHWORKER_STACK_TLS_REGISTRY"], env["PUSHWORKER_STACK_PLAIN_REGISTRY"]
    users = {
        tls: (env["PUSHWORKER_STACK_TLS_USER"], env["PUSHWORKER_STACK_TLS_PASSWORD_FILE"]),
        plain: (env["PUSHWORKER_STACK_PLAIN_USER"], env["PUSHWORKER_STACK_PLAIN_PASSWORD_FILE"]),
    }
    secrets = {host: (user, Path(path).read_text().strip()) for host, (user, path) in users.items()}
    ca = Path(env["PUSHWORKER_STACK_TLS_CA"]).read_text()
    work = Path(tempfile.mkdtemp(prefix="bench-skopeo-seam-"))
    try:
        auths = {
            host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
            for host, (user, password) in secrets.items()
        }
        (work / "auth.json").write_text(json.dumps({"auths": auths}))
        os.chmod(work / "auth.json", 0o600)
        (work / "certs").mkdir()
        (work / "certs" / "ca.crt").write_text(ca)

        def bare(*argv: str) -> None:
            home = tempfile.mkdtemp(dir=work)
            fresh = {"HOME": home, "XDG_RUNTIME_DIR": home, "PATH": "/usr/bin:/bin"}
            done = subprocess.run(
                [SKOPEO, *argv], env=fresh, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"skopeo {argv[0]} failed: {done.stderr.strip()[-400:]}")

        def seeded() -> str:
            layout = work / f"layout-{uuid.uuid4().hex[:8]}"
            write_oci_layout(layout, layer_bytes=args.mib * 1024 * 1024,
                             platforms=(("linux", "amd64"),))  # fmt: skip
            repository = f"bench-seam/src-{uuid.uuid4().hex[:8]}"
            bare("copy", "--quiet", "--all", "--preserve-digests",
                 "--dest-authfile", str(work / "auth.json"), "--dest-cert-dir", str(work / "certs"),
                 f"oci:{layout}", f"docker://{tls}/{repository}:seed")  # fmt: skip
            shutil.rmtree(layout)
            return repository

        source_access = RegistryAccess(
            RegistryEndpoint(id=1, url=f"https://{tls}", host=tls, ca_cert=ca),
            Credential(secrets[tls][0], Secret(secrets[tls][1]), "secret"),
        )
        dest_access = RegistryAccess(
            RegistryEndpoint(id=2, url=f"http://{plain}", host=plain),
            Credential(secrets[plain][0], Secret(secrets[plain][1]), "secret"),
        )
        seam = Skopeo(SKOPEO, timeout=600)
        times: dict[str, list[float]] = {"seam": [], "bare": []}
        for run in range(args.runs + 1):
            order = ("seam", "bare") if run % 2 == 0 else ("bare", "seam")
            sources = {way: seeded() for way in order}
            for way in order:
                target = f"{plain}/bench-seam/{way}-{uuid.uuid4().hex[:8]}:v1"
                started = time.perf_counter()
                if way == "seam":
                    source = CopySource("docker", f"{tls}/{sources[way]}:seed", source_access)
                    seam.copy(source, target, dest_access)
                else:
                    bare("copy", "--quiet", "--all", "--preserve-digests", "--retry-times", "0",
                         "--src-authfile", str(work / "auth.json"),
                         "--src-cert-dir", str(work / "certs"),
                         "--dest-authfile", str(work / "auth.json"), "--dest-tls-verify=false",
                         f"docker://{tls}/{sources[way]}:seed", f"docker://{target}")  # fmt: skip
                if run:
                    times[way].append(time.perf_counter() - started)
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

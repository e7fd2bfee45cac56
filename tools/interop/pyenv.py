"""Virtual environments for the interop tools (standard library only).

ensure_venv(dir, requirements) makes `dir` a venv with exactly the pinned
requirements installed, reusing it when a marker file in it records the same
requirements text. PyPI is reached through pip's own configuration (index,
proxy, certificates); nothing else is downloaded.

Exit code 77 (EXIT_SKIP) is reserved for "PyPI is unreachable": the callers
turn it into a skipped test, never into a pass.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

EXIT_SKIP = 77
MARKER = "qcal-requirements.sha256"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _digest(requirements):
    with open(requirements, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def pypi_reachable(python, timeout=90):
    """True when pip can fetch one small distribution (metadata and file)."""
    tmp = tempfile.mkdtemp(prefix="qcal_pypi_probe_")
    try:
        p = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                            "--disable-pip-version-check", "-q", "-d", tmp, "six"],
                           capture_output=True, text=True, timeout=timeout)
        return p.returncode == 0, (p.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        return False, f"pip download timed out after {timeout} s"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_venv(venv, requirements):
    """Returns the venv's python. Exits EXIT_SKIP when PyPI is unreachable and the
    venv is not there yet; raises SystemExit(1) when the install itself fails."""
    want = _digest(requirements)
    marker = os.path.join(venv, MARKER)
    if os.path.exists(marker) and open(marker).read().strip() == want:
        return venv_python(venv)
    ok, why = pypi_reachable(sys.executable)
    if not ok:
        log(f"SKIP: PyPI is unreachable ({why}); the interop checks need pip to install "
            f"the pinned loaders of {requirements}")
        sys.exit(EXIT_SKIP)
    t0 = time.time()
    log(f"interop: creating {venv} from {requirements} (first run: downloads torch and "
        "its CUDA runtime wheels, about 3 GB)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = venv_python(venv)
    p = subprocess.run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                        "-r", requirements])
    if p.returncode != 0:
        log(f"FAIL: pip install -r {requirements} into {venv} failed (exit {p.returncode})")
        raise SystemExit(1)
    with open(marker, "w") as f:
        f.write(want + "\n")
    log(f"interop: {venv} ready in {time.time() - t0:.0f} s")
    return py

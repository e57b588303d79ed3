"""recipes/demo.sh picks its stack: the CPU one as before where no NVIDIA GPU answers, the GPU
one of .ci/constraints-gpu.txt (.ci/env-gpu.sh) and recipes/demo-gpu.yaml where nvidia-smi
lists a GPU. Checked with a fake nvidia-smi on PATH and a fake interpreter whose torch is the
pinned CUDA release, in the script's dry-run mode (it prints its plan and changes nothing);
one test installs for real from a wheel directory, without an index."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tool(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def host(tmp_path) -> dict:
    """bin/ (nvidia-smi listing an H100), a python whose torch is 2.11.0+cu130 (a fake package
    ahead of the real site), a wheel directory with one small wheel, and the environment to run in."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    tool(bin_ / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    site = tmp_path / "site" / "torch"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text('__version__ = "2.11.0+cu130"\nclass version:\n    cuda = "13.0"\n')
    py = tool(bin_ / "hostpython", f"#!/bin/sh\nPYTHONPATH={site.parent} exec {sys.executable} \"$@\"\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "sqdummy-1.0-py3-none-any.whl", "w") as z:
        z.writestr("sqdummy/__init__.py", "X = 1\n")
        z.writestr("sqdummy-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: sqdummy\nVersion: 1.0\n")
        z.writestr("sqdummy-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        z.writestr("sqdummy-1.0.dist-info/RECORD", "")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SQUEEZE_", "PIP_"))}
    env.update(PATH=f"{bin_}:/usr/bin:/bin", SQUEEZE_VENV=str(tmp_path / "venv"), SQUEEZE_PYTHON=str(py),
               SQUEEZE_DRY_RUN="1")
    return {"bin": bin_, "site": site.parent, "wheels": wheels, "env": env, "venv": tmp_path / "venv"}


def demo(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "recipes" / "demo.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_gpu_host_with_wheels_reuses_its_cuda_torch_and_installs_offline(host):
    r = demo({**host["env"], "SQUEEZE_WHEELS": str(host["wheels"])}, "--force")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "would run: squeeze run recipes/demo-gpu.yaml --force"
    err, venv, wheels = r.stderr, host["venv"], host["wheels"]
    assert f"torch 2.11.0 reused from {host['site']}" in err and f"packages from {wheels}" in err
    assert "_squeeze_system_torch.pth" in err and f"{host['site']}\n" in err
    assert (f"+ {venv}/bin/python -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "
            f"{wheels} {wheels}/sqdummy-1.0-py3-none-any.whl") in err
    assert f"--no-index --no-deps --no-build-isolation --find-links {wheels} -e {REPO}\n" in err
    assert f"+ {venv}/bin/python -m eval.stack" in err and "constraints-gpu.txt -e" not in err
    assert not venv.exists()  # a dry run changes nothing


def test_gpu_host_with_an_index_installs_the_pinned_stack(host):
    (host["site"] / "torch" / "__init__.py").write_text('__version__ = "2.11.0"\nclass version:\n    cuda = None\n')
    r = demo(host["env"])
    assert r.returncode == 0 and r.stdout.startswith("would run: squeeze run recipes/demo-gpu.yaml"), r.stderr
    assert "torch 2.11.0 installed), packages from the package index" in r.stderr  # a CPU build is not reused
    assert f"-c {REPO}/.ci/constraints-gpu.txt -e {REPO}[gpu]" in r.stderr and "_squeeze_system_torch" not in r.stderr


@pytest.mark.parametrize("smi", [None, "#!/bin/sh\necho 'No devices were found'\nexit 6\n"])
def test_cpu_host_keeps_the_cpu_demo(host, smi):
    (host["bin"] / "nvidia-smi").unlink()
    if smi:
        tool(host["bin"] / "nvidia-smi", smi)
    r = demo(host["env"], "--force")
    assert r.returncode == 0 and r.stdout.strip() == "would run: squeeze run recipes/demo.yaml --force"
    assert "setting up" not in r.stderr and "constraints-gpu" not in r.stderr
    assert ("nvidia-smi lists no GPU" in r.stderr) == bool(smi)


def test_missing_wheel_directory_is_one_line(host, tmp_path):
    r = demo({**host["env"], "SQUEEZE_WHEELS": str(tmp_path / "nowhere")})
    assert r.returncode == 1 and r.stderr == f"error: SQUEEZE_WHEELS: no such directory: {tmp_path / 'nowhere'}\n"


def test_offline_install_for_real_stops_at_what_the_wheels_lack(host):
    """Not a dry run: the environment is made, sees the host's torch through the .pth file, gets
    the directory's wheel with no index; then squeeze itself, and the stack check says in one
    line what is missing (vllm and the rest are not in this directory), so the run stops."""
    env = {k: v for k, v in host["env"].items() if k != "SQUEEZE_DRY_RUN"}
    r = demo({**env, "SQUEEZE_WHEELS": str(host["wheels"])})
    assert r.returncode == 1
    py = host["venv"] / "bin" / "python"
    got = subprocess.run([str(py), "-c", "import torch, sqdummy; print(torch.__version__, torch.__file__)"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert got.stdout.split() == ["2.11.0+cu130", str(host["site"] / "torch" / "__init__.py")], got.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the GPU environment in {host['venv']} is incomplete") or \
        last == f"error: squeeze did not install from {host['wheels']}: it needs setuptools>=77, in the " \
                "environment or as a wheel in DIR", r.stderr[-2000:]
    assert not (host["venv"] / ".squeeze-env").exists()  # not marked current: the next run tries again

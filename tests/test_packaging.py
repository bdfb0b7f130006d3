"""The wheel: built from the checkout, installed in a clean virtual environment, imported from elsewhere."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_checkout(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), ROOT],
        check=True, capture_output=True, timeout=600,
    )
    wheels = list(wheel_dir.glob("triton_adadelta-*.whl"))
    assert len(wheels) == 1
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "triton_adadelta/kernels/adadelta.py" in names
    assert "triton_adadelta/kernels/adadelta_cpu.c" in names  # the fused CPU path's source, built on first use
    assert not any(n.startswith("kernels/") for n in names), "must not install a top-level `kernels` package"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # torch and triton without a download: the running interpreter's site directories, appended to the new
    # venv's path by a .pth file. (system_site_packages would give the base interpreter's, which have no
    # torch when the suite itself runs in a venv.) The .pth files in those directories are not processed,
    # so an editable install of this package there stays out; the wheel below is the only copy.
    site_dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    own_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(own_site, "outer_site_packages.pth"), "w") as pth:
        pth.write("".join(d + "\n" for d in site_dirs if os.path.isdir(d)))
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheels[0])], check=True, timeout=600)
    code = (
        "import os, triton_adadelta, triton_adadelta.kernels as k, torch;"
        "assert 'site-packages' in triton_adadelta.__file__, triton_adadelta.__file__;"
        "assert os.path.dirname(k.__file__) == os.path.join(os.path.dirname(triton_adadelta.__file__), 'kernels');"
        "p = [torch.randn(5)]; o = triton_adadelta.Adadelta(p); p[0].grad = torch.randn(5); o.step();"
        "print('ok', float(o.state[p[0]]['step']));"
        # A CPU step builds the shipped C source of the fused CPU path into a fresh cache.
        "from triton_adadelta import cpu_fused;"
        "q = [torch.randn(70_000)]; o = triton_adadelta.Adadelta(q); q[0].grad = torch.randn(70_000); o.step();"
        "lib = cpu_fused._library;"
        "print(lib is not None and os.path.dirname(lib.path) == os.environ['TRITON_ADADELTA_CACHE_DIR'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["TRITON_ADADELTA_CACHE_DIR"] = str(tmp_path / "cache")
    out = subprocess.run([py, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "1.0", "True"], out.stdout

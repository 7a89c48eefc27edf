"""The package as a site installs it: a wheel (not this checkout), run from a folder that is not the
checkout, finds everything it reads at run time (the sbatch template) and renders a job."""
import pytest
import os
import shutil
import subprocess
import sys
import zipfile

from helpers import ROOT, base_recipe, write_recipe

pytestmark = pytest.mark.e2e      # builds the wheel and installs it into a fresh folder


def test_wheel_installed_elsewhere_renders_a_job_from_an_unrelated_folder(tmp_path):
    wheels, site, work, src = (tmp_path / d for d in ("wheels", "site", "elsewhere", "src"))
    work.mkdir()
    # setuptools builds in the source tree: build a copy, so the checkout gets no build/ folder
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                             "__pycache__", "wandb", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, cwd=tmp_path)
    wheel, = wheels.glob("qhm_launch-*.whl")
    assert "launcher/cluster/templates/job.sbatch" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)

    # Only the installed copy is importable: the checkout's editable hook comes after PYTHONPATH, and
    # the working directory holds nothing but the recipe.
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import launcher, qhm; print(launcher.__file__, qhm.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where

    write_recipe(work, base_recipe(name="pkg"))
    out = subprocess.run([sys.executable, "-m", "launcher", "submit", "recipe.yaml", "--dry-run", "--nodes", "2",
                          "--setup", "module load cuda/12.4", "--setup", "source ~/env/bin/activate"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    script = out.stdout
    assert script.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in script
    assert "module load cuda/12.4\nsource ~/env/bin/activate\n" in script     # before the exports and the run
    assert script.index("module load") < script.index("-m launcher run")
    assert f"{sys.executable} -m launcher run" in script                     # the Python that ran submit
    assert not (work / "runs").exists()

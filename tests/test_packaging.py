"""The package as users install it: a wheel built from this tree, installed into a fresh venv, runs
every command's --help and the smoke pipeline; the core (`pip install lapo-fast`) requires only
torch, numpy and triton; with the extras' modules hidden the core still imports and works, and each
command names the extra it needs."""

import email
import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from lapo_fast.cli import build_parser
from lapo_fast.extras import EXTRA_OF

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = tuple(EXTRA_OF)  # every module an extra brings


def _commands() -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    out = []
    for name, p in sub.choices.items():
        out.append([name])
        inner = [a for a in p._actions if getattr(a, "dest", "") == "data_command"]
        out += [[name, n] for a in inner for n in a.choices]
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree's files (git's view: no build/ leftovers to hide a
    package the build leaves out)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=src)
    (found,) = out.glob("lapo_fast-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel installed (no editable lapo_fast anywhere on its path); the third-
    party packages are this environment's (a .pth to its site-packages), so no download is needed."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False)
    site = next((root / "lib").glob("python*/site-packages"))
    theirs = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(theirs) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True)
    return root


def test_the_core_requires_torch_numpy_and_triton_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith("METADATA"))))
        names = z.namelist()
    core = sorted({r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip()
                   for r in meta.get_all("Requires-Dist") if "extra ==" not in r})
    assert core == ["numpy", "torch", "triton"]
    assert {"procgen", "video", "report", "train", "dali", "test"} <= set(meta.get_all("Provides-Extra"))
    # Every package of the tree is in the wheel, the Triton kernels and the C++ extension too.
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "lapo_fast").rglob("__init__.py")}
    assert packages <= {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    assert "lapo_fast/kernels/vq.py" in names and any(n.startswith("lapo_fast/_C") for n in names)


def test_the_installed_wheel_runs_every_help_and_the_smoke_pipeline(fresh_venv, tmp_path):
    exe = fresh_venv / "bin" / "lapo-fast"
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run([fresh_venv / "bin" / "python", "-c", "import lapo_fast, lapo_fast.kernels.vq, "
                            "lapo_fast._C; print(lapo_fast.__file__)"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, check=True).stdout
    assert str(fresh_venv) in where, where  # the wheel's copy, not this tree's
    # --help of every command in one interpreter (one torch import), each through the real entry point.
    script = textwrap.dedent(f"""
        import sys
        from lapo_fast.cli import main
        for cmd in {_commands()!r}:
            try:
                main(cmd + ["--help"])
            except SystemExit as e:
                assert e.code == 0, (cmd, e.code)
        """)
    out = subprocess.run([fresh_venv / "bin" / "python", "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert subprocess.run([exe, "--help"], capture_output=True, env=env, cwd=tmp_path).returncode == 0
    # The product's command exactly as a user types it; the machine's preset from the environment (smoke here).
    run = subprocess.run(f"{exe} train --env starpilot", shell=True, capture_output=True, text=True,
                         env={**env, "LAPO_FAST_PRESET": "smoke"}, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "train: preset 'smoke' (LAPO_FAST_PRESET=smoke in the environment)" in run.stdout
    assert (tmp_path / "runs" / "starpilot-smoke" / "report.md").exists()


def test_another_project_imports_the_fused_op_from_the_wheel(fresh_venv, tmp_path):
    """`from lapo_fast.ops import vq_ema, VectorQuantizerEMA` in a file of another project, run by the
    wheel's interpreter from that project's folder: the op's numbers are the PyTorch reference's."""
    project = tmp_path / "my_vq_project"
    project.mkdir()
    (project / "train_tokenizer.py").write_text(textwrap.dedent("""
        import torch
        import lapo_fast
        from lapo_fast.ops import VectorQuantizerEMA, vq_ema, vq_ema_reference, Layout

        torch.manual_seed(0)
        x = torch.randn(64, 2 * 16 * 4)
        cb = torch.randn(2, 64, 16)
        ours, theirs = (cb.clone(), torch.zeros(2, 64), cb.clone()), (cb.clone(), torch.zeros(2, 64), cb.clone())
        out = vq_ema(x, *ours, layout="lapo", num_latents=4, training=True)
        q, _, loss, _ = vq_ema_reference(x, *theirs, Layout.of(x, 2, 16, "lapo", 4), training=True, decay=0.999,
                                         eps=1e-5, commitment=0.05)
        assert torch.allclose(out.quantized, q, atol=1e-5) and torch.allclose(out.loss, loss, rtol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(ours, theirs))  # the EMA update too
        vq = VectorQuantizerEMA()
        y = vq(torch.randn(8, 128, requires_grad=True))
        y.quantized.sum().backward()
        print("ok", lapo_fast.__file__)
        """))
    out = subprocess.run([fresh_venv / "bin" / "python", "train_tokenizer.py"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=project)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok") and str(fresh_venv) in out.stdout  # the wheel's copy, not this tree


_BLOCKER = textwrap.dedent(f"""
    import sys
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if any(name == h or name.startswith(h + ".") for h in {HIDDEN!r}):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Hide())
    import importlib.util
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: (None if any(name == h or name.startswith(h + ".") for h in {HIDDEN!r})
                                                 else real(name, *a))
    """)


def _core_only(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path)


def test_the_core_works_without_any_extra(tmp_path):
    out = _core_only("""
        import torch
        from lapo_fast.ops import VectorQuantizerEMA, vq_ema
        from lapo_fast.models import LatentActionModel
        vq = VectorQuantizerEMA()
        print(vq(torch.randn(8, 128)).indices.shape)
        from lapo_fast.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
        """, tmp_path)
    assert out.returncode == 0 and "torch.Size([8, 2, 4])" in out.stdout, out.stderr[-2000:]
    assert "lam" in out.stdout and "stage 1" in out.stdout  # the commands are listed; each names its extra


@pytest.mark.parametrize("cmd,extra", [(["lam", "--data", "d", "--out", "r"], "train"),
                                        (["eval", "--env", "starpilot", "--out", "r"], "procgen,train"),
                                        (["lam", "--help"], "train"),  # its flags come from tyro
                                        (["report", "--out", "r"], "report,train"),
                                        (["data", "ingest", "v.mp4", "--out", "o"], "train,video"),
                                        (["train", "--env", "starpilot"], "procgen,report,train"),
                                        (["aggregate", "d"], "report,sweep")])
def test_a_command_without_its_extra_names_it_in_one_line(cmd, extra, tmp_path):
    out = _core_only(f"""
        from lapo_fast.cli import main
        main({cmd!r})
        """, tmp_path)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and f"pip install 'lapo-fast[{extra}]'" in last, out.stderr[-1500:]
    assert not (tmp_path / "r").exists()  # stopped before any work


def test_every_module_an_extra_brings_is_listed_in_that_extra_in_pyproject():
    """lapo_fast.extras maps modules to extras; pyproject.toml lists the packages of each extra:
    the package installed for each module is in its extra's list (or one that extra includes)."""
    import importlib.metadata
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def packages(extra: str) -> set[str]:
        out = set()
        for req in extras[extra]:
            name = re.split(r"[<>=!;\[ ]", req, maxsplit=1)[0].lower()
            nested = re.match(r"lapo-fast\[(.*)\]", req)
            out |= set().union(*(packages(e) for e in nested.group(1).split(","))) if nested else {name}
        return out

    dists = importlib.metadata.packages_distributions()
    for module, extra in EXTRA_OF.items():
        installed = {d.lower() for d in dists.get(module.split(".")[0], [])}
        assert installed, f"{module} is not installed by the test extra"
        if module == "nvidia.dali":  # the namespace package 'nvidia' is shared by many distributions
            installed = {d for d in installed if "dali" in d}
        assert installed & packages(extra), (module, extra, installed)

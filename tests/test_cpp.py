"""The C++ tests (csrc/tests/): the CPU VQ kernel's planning, search and reduction, each against a
scalar computation, built with CMake and run by ctest."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake (the test extra installs it)")
def test_the_cpp_tests_pass(tmp_path):
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in (["cmake", "-S", str(ROOT / "csrc" / "tests"), "-B", str(tmp_path), *generator],
                ["cmake", "--build", str(tmp_path), "-j", "2"],
                ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stdout[-3000:] + out.stderr[-3000:])
    assert "100% tests passed" in out.stdout

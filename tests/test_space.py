"""The repository can be pushed to a Hugging Face Space as it is: binary files under LFS rules, and the
README's front matter consistent with what the app pins and runs."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_every_tracked_binary_file_goes_to_lfs():
    files = [f for f in _git("ls-files", "-z").split("\0") if f and (ROOT / f).is_file()]
    binary = [f for f in files if b"\0" in (ROOT / f).read_bytes()[:8000]]
    assert binary, "expected weights and images among the tracked files"
    attrs = dict(line.rsplit(": filter: ", 1) for line in _git("check-attr", "filter", "--", *binary).splitlines())
    assert {f: attrs[f] for f in binary if attrs[f] != "lfs"} == {}


def test_front_matter_matches_the_app():
    front = (ROOT / "README.md").read_text().split("---\n")[1]
    fields = dict(re.findall(r"^(\w+): \"?([^\"\n]+)\"?$", front, re.M))
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split() if "==" in line)
    assert fields["sdk"] == "gradio" and fields["sdk_version"] == pins["gradio"]
    assert (ROOT / fields["app_file"]).is_file() and fields["python_version"] == "3.11"

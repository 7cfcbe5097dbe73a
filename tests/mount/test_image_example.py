"""The image example (examples/image_demo.py) runs end to end as the current user: the shell inside the writable
mount sees the image's two layers, the commit makes a third, the re-mounted image shows the change; an error
half-way still unmounts and removes everything; a busybox that is not static is refused."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from mounthelp import mounts

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/bin/busybox"),
                       reason="/bin/busybox is missing (Debian package busybox-static; tests/setup.sh installs it)"),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "image_demo.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_demo", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workdir(out: str) -> Path:
    found = re.search(r"^Working in T=(.+)$", out, re.M)
    assert found, out
    return Path(found.group(1))


def mounted_under(d: Path) -> list[str]:
    real = os.path.realpath(d)
    return [m.target for m in mounts() if m.target == real or m.target.startswith(real + "/")]


def section(out: str, title: str) -> list[str]:
    """The output lines (stripped) of the step whose narration starts with ``title``."""
    parts = [p for p in out.split("\n== ") if p.startswith(title)]
    assert len(parts) == 1, (title, out)
    return [line.strip() for line in parts[0].splitlines()[1:]]


def test_the_example_runs_the_whole_workflow(fuse_ready: None) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(ROOT), stdin=subprocess.DEVNULL)
    out = done.stdout
    t = workdir(out)
    assert mounted_under(t) == [] and not t.exists(), out
    if done.returncode != 0 and "busybox-static" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr + out
    assert done.stderr == ""

    imported = section(out, "Importing it")
    assert any(line.startswith("imported demo:1 (") and ": 2 layers, 2 applied" in line for line in imported)
    assert any(re.fullmatch(r"size: .* in 2 layers", line) for line in imported), imported

    # the shell in the writable mount: root of the image, both layers (motd of the second, issue whited out)
    rw = section(out, "Mounting it writable")
    shell = "$ chroot $T/mnt /bin/sh -c '" if os.geteuid() == 0 else "$ unshare -r chroot $T/mnt /bin/sh -c '"
    assert shell in rw
    assert "Welcome to the busybox demo (second layer)." in rw and 'NAME="busybox demo"' in rw
    assert any(line.startswith("uid=0(root) gid=0(root)") for line in rw), rw
    listing = rw[rw.index("ls /etc'") + 1:]
    assert {"group", "os-release", "passwd"} <= set(listing) and not {"motd", "issue"} & set(listing)

    committed = section(out, "Unmounting, then committing")
    assert any(line.startswith("committed demo:2 (on demo:1): a new layer ") for line in committed)
    layers = [line for line in committed if re.match(r"[123]  [0-9a-f]{12}  ", line)]
    assert [line[0] for line in layers] == ["1", "2", "3"], committed
    assert any(re.fullmatch(r"size: .* in 3 layers", line) for line in committed), committed
    assert committed[-1].endswith("  unionfs image commit")  # the history entry of the new layer

    exported = section(out, "Exporting demo:2")
    assert "exported demo:2 to $T/demo-2.tar (an OCI archive)" in exported
    if shutil.which("skopeo"):  # skopeo lists the same three layers
        assert any(line.startswith("skopeo reads it: 3 layers, linux/") for line in exported), exported
        listed = [m.group(1) for line in exported if (m := re.fullmatch(r'"(sha256:[0-9a-f]{64})",?', line))]
        assert [d.partition(":")[2][:12] for d in listed] == [line.split()[1] for line in layers]

    ro = section(out, "Mounting demo:2 read-only")
    assert "hello from inside the image" in ro and "/etc/motd is gone" in ro
    assert "touch: /new: Read-only file system" in ro
    listing = ro[ro.index("touch /new || true'") + 1:]
    assert not {"motd", "issue"} & set(listing) and "passwd" in listing
    assert f"Done: everything is unmounted and {t} has been removed." in out


def test_an_error_half_way_still_unmounts_and_removes_everything(
        fuse_ready: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    demo = load_example()
    seen: list[Path] = []

    def failing_shell(self: object, mnt: Path, script: str) -> str:
        assert mnt.joinpath("bin/busybox").is_file()  # the writable mount is up
        seen.append(mnt)
        raise demo.DemoError("the shell failed")

    monkeypatch.setattr(demo.Demo, "shell", failing_shell)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    status = demo.main()
    captured = capsys.readouterr()
    t = workdir(captured.out)
    assert status == 1, captured.err
    assert captured.err == "image-demo: the shell failed\n"
    assert seen == [t / "mnt"]
    assert mounted_under(t) == [] and not t.exists()


@pytest.mark.parametrize("kind", ["missing", "not ELF", "dynamic"])
def test_a_busybox_that_is_not_static_is_refused_naming_the_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    demo = load_example()
    fake = tmp_path / "busybox"
    if kind == "not ELF":
        fake.write_text("#!/bin/sh\n")
    elif kind == "dynamic":
        dynamic = Path(os.path.realpath(shutil.which("ls") or "/bin/ls"))
        if b"ld-linux" not in dynamic.read_bytes()[:4096]:
            pytest.skip(f"{dynamic} is not dynamically linked")
        fake.write_bytes(dynamic.read_bytes())
    monkeypatch.setattr(demo, "BUSYBOX", fake)
    with pytest.raises(demo.DemoError) as caught:
        demo.static_busybox()
    message = str(caught.value)
    assert "busybox-static" in message and str(fake) in message and "\n" not in message


def test_the_static_check_agrees_with_ldd() -> None:
    demo = load_example()
    ldd = subprocess.run(["ldd", "/bin/busybox"], capture_output=True, text=True)
    if "not a dynamic executable" in ldd.stdout + ldd.stderr:
        assert demo.static_busybox() == Path("/bin/busybox").read_bytes()
    else:
        with pytest.raises(demo.DemoError, match="busybox-static"):
            demo.static_busybox()

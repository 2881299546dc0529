"""Issue #22, acceptance 1: the README's train-and-publish flow ends in a classified image.

Runs, as a new user would and as separate processes, `fovea up`, then `fovea train --model cnn --dataset
digits`, `fovea model export --checkpoint … --evaluate --int8`, `fovea publish … --promote production` and
`fovea classify --model digits-cnn digit.png`, in a fresh folder, with nothing restarted between them: the
pool worker `fovea up` started must be assigned the new model by the registry's placement and serve it, and
the classify must answer with the right digit within 30 s of the publish.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import time

import pytest

from fovea.cluster import ROOT

FOVEA = pathlib.Path(sys.executable).with_name("fovea")  # the console script the README runs (.venv/bin/fovea)
PUBLISH_TO_ANSWER_S = 30.0  # the bound: publish, then a right answer within 30 s
EPOCHS = "10"  # about 10 s on 2 cores; 99% top-1 on digits' test split


def run(args: list[str], cwd: pathlib.Path, env: dict[str, str], timeout_s: float) -> str:
    """One CLI command; its stdout, or a failure that quotes its stderr."""
    t0 = time.monotonic()
    out = subprocess.run(
        [str(FOVEA), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert out.returncode == 0, f"fovea {' '.join(args)}: exit {out.returncode}\n{out.stderr[-3000:]}"
    print(f"fovea {args[0]}: {time.monotonic() - t0:.1f} s")
    return out.stdout


def read_lines(proc: subprocess.Popen[bytes], names: tuple[str, ...], timeout_s: float) -> dict[str, str]:
    """The 'name: value' lines `fovea up` prints on stdout, once all of `names` have come."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    found: dict[str, str] = {}
    buffer = b""
    deadline = time.monotonic() + timeout_s
    while not all(n in found for n in names):
        assert proc.poll() is None, f"fovea up exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"fovea up printed {found} after {timeout_s:.0f} s"
        if sel.select(0.2):
            buffer += os.read(proc.stdout.fileno(), 4096)
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                name, _, value = line.decode().partition(": ")
                found[name.strip()] = value.strip()
    sel.close()
    return found


def wait_for_text(path: pathlib.Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert proc.poll() is None, f"fovea up exited ({proc.returncode}):\n{content[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} from fovea up after {timeout_s:.0f} s:\n{content[-3000:]}"
        time.sleep(0.2)


def digit_png(run_dir: pathlib.Path) -> tuple[bytes, str]:
    """A digit from the held-out split of scikit-learn's digits, scaled up 8 times (nearest) to a 64x64 PNG, and
    its true class. The first one the exported model gets right offline, so that a failure here is the
    serving path's, not the short training's."""
    import numpy as np
    from PIL import Image

    from training.datasets import load_digits
    from training.evaluate import predict_onnx
    from training.export import read_metadata

    test = load_digits().test
    model = run_dir / "model.onnx"
    predicted = predict_onnx(model, test.images[:20], read_metadata(model)["preprocessing"]).argmax(1)
    index = int(np.flatnonzero(predicted == test.labels[:20])[0])
    big = np.kron(test.images[index, :, :, 0], np.ones((8, 8), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    return buf.getvalue(), str(int(test.labels[index]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_flow_train_publish_classify_without_restart(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOVEA_") and k != "REDIS_URL"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    up_log = tmp_path / "up.stderr"
    with open(up_log, "wb") as err:
        # The README's `fovea up`, on free ports and with its data in this test's folder.
        up = subprocess.Popen(
            [str(FOVEA), "up", "--data-dir", str(tmp_path / "var"), "--gateway-port", "0", "--registry-port", "0"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # its own process group, so that a failed test can end all it started
        )
    try:
        t0 = time.monotonic()
        lines = read_lines(up, ("gateway", "api key"), timeout_s=300)
        log = wait_for_text(up_log, "cluster is up", up, timeout_s=300)
        print(f"fovea up: {time.monotonic() - t0:.1f} s to 'cluster is up'")
        registry = next(line for line in log.splitlines() if line.startswith("registry: ")).split()[1]
        env["FOVEA_API_KEY"] = lines["api key"]

        run(["train", "--model", "cnn", "--dataset", "digits", "--epochs", EPOCHS], tmp_path, env, 300)
        run_dir = tmp_path / "runs" / "digits-cnn"
        run(["model", "export", "--checkpoint", "runs/digits-cnn", "--evaluate", "--int8"], tmp_path, env, 300)
        image, expected = digit_png(run_dir)
        (tmp_path / "digit.png").write_bytes(image)

        publish = ["publish", "runs/digits-cnn", "--name", "digits-cnn", "--variant", "fp32", "--variant", "int8"]
        run([*publish, "--promote", "production", "--registry", registry], tmp_path, env, 120)
        published = time.monotonic()
        classify = ["classify", "--model", "digits-cnn", "digit.png", "--address", lines["gateway"]]
        out = run([*classify, "--timeout-s", str(PUBLISH_TO_ANSWER_S)], tmp_path, env, 60)
        elapsed = time.monotonic() - published
        print(f"publish to first answer: {elapsed:.1f} s")
        # "digit.png  (digits-cnn v1)" then "  0.9876  7" per label, best first
        header, best = out.splitlines()[:2]
        assert header == "digit.png  (digits-cnn v1)", out
        assert best.split()[1] == expected, out
        assert elapsed <= PUBLISH_TO_ANSWER_S, f"answered {elapsed:.1f} s after the publish"
        assert up.poll() is None, "fovea up kept running: nothing was restarted"
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)  # whatever of its group outlived it (a crash, a timeout)

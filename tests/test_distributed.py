"""Sensitivity probes spread over 2 processes with mlx.launch (ring backend on
loopback) measure the same tables as one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_model

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def launch(script: str, args: list, tmp_path: Path, n: int = 2):
    """The script under mlx.launch with n processes (n=1: plain, in the same
    environment, so both runs use the same BLAS)."""
    if not Path(LAUNCH).exists():
        pytest.skip("mlx.launch not installed")
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    if n > 1:
        cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "-p", str(free_port_pair()), "--cwd", str(tmp_path), "--", *cmd]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_kv_cache_over_two_processes_gives_the_single_process_table(tmp_path):
    src = str(build_model(tmp_path / "llama", "llama", hidden_size=128))  # head dimension 32
    common = ["--n-calibration", "2", "--seq-len", "24", "--candidate-bits", "2,4,8", "--split-bits", "8:4", "--target-bits", "5", "--group-size", "32", "--quiet"]
    launch("kv_cache.py", [src, "-o", str(tmp_path / "one"), *common], tmp_path, n=1)
    launch("kv_cache.py", [src, "-o", str(tmp_path / "two"), *common], tmp_path)
    one = json.loads((tmp_path / "one" / "kv_plan.json").read_text())
    two = json.loads((tmp_path / "two" / "kv_plan.json").read_text())
    assert one == two
    assert not list(tmp_path.glob(".two.*"))  # rank 1 wrote nothing, not even a temporary folder


def test_convert_sensitivity_over_two_processes_gives_the_single_process_table(model_factory, tmp_path):
    src = str(model_factory("llama"))
    common = ["--target-bpw", "4.5", "--n-calibration", "2", "--seq-len", "32", "--no-eval", "--quiet", "--candidate-bits", "2,4,8", "--group-sizes", "32", "--measure", "all"]
    launch("convert.py", [src, "-o", str(tmp_path / "one"), *common], tmp_path, n=1)
    launch("convert.py", [src, "-o", str(tmp_path / "two"), *common], tmp_path)
    one = json.loads((tmp_path / "one" / "optiq_metadata.json").read_text())
    two = json.loads((tmp_path / "two" / "optiq_metadata.json").read_text())
    assert one["sensitivity"]["layers"] == two["sensitivity"]["layers"]
    assert one["plan"]["assignments"] == two["plan"]["assignments"]


def served_completion(cmd, port, env, prompt="The quick brown"):
    """Start a server command, ask one greedy completion, stop it."""
    import signal
    import time
    import urllib.request

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not start: {proc.stdout.read()[-3000:]}")
                time.sleep(0.5)
        model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read())["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
        answers = []
        for _ in range(2):  # twice: the ranks stay in step across requests
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
            answers.append(json.loads(urllib.request.urlopen(req, timeout=120).read()))
        return answers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_sharded_over_two_processes_answers_like_one(model_factory):
    if not Path(LAUNCH).exists():
        pytest.skip("mlx.launch not installed")
    src = str(model_factory("llama"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    serve = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", src, "--max-tokens", "12"]
    port_one, port_two = free_port_pair(), free_port_pair()
    one = served_completion([*serve, "--port", str(port_one)], port_one, env)
    launch_port = free_port_pair()
    two = served_completion([LAUNCH, "-n", "2", "--backend", "ring", "-p", str(launch_port), "--", *serve, "--port", str(port_two)], port_two, env)
    for a, b in zip(one, two):
        assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["usage"] == b["usage"]
    assert two[0]["choices"][0]["text"] == two[1]["choices"][0]["text"]

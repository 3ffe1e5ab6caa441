"""`ray job submit` round trip: a real head on 127.0.0.1, a preprocessing job, the table checked.

The head runs as ``ray start --head --block`` in its own session; it is stopped by signalling
that process group by id (SIGTERM, then SIGKILL) — never with ``ray stop``, which would stop every
Ray on the machine.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from maskloom import tables

HERE = os.path.dirname(os.path.abspath(__file__))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: {proc.communicate()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} not open after {timeout} s")


@pytest.fixture(scope="module")  # one head for the tests here (it takes ~8 s to start)
def ray_head():
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={free_port()}", "--num-cpus=2",
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(dash, head, 120)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):  # this head's session only
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(grace)
        head.wait(10)


def test_ray_job_submit_preprocess_round_trip(tmp_path, ray_head):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"{i % 2}_{i}.txt").write_text(f"{i} {i}")
    (data / "1_bad.txt").write_text("oops")
    work = tmp_path / "job"
    work.mkdir()
    shutil.copy(os.path.join(HERE, "ppkit_tokenizer.py"), work)  # the plug-in tokenizer travels with the job
    out = tmp_path / "table"
    cmd = [RAY, "job", "submit", f"--address={ray_head['dashboard']}", f"--working-dir={work}", "--",
           sys.executable, "-m", "maskloom.cli", "preprocess", str(data), "-m", "ppkit_numbers", "-o", str(out),
           "--import", "ppkit_tokenizer", "--labels", "regex", "--label-regex", r"^(?P<label>\d)_",
           "--shard-size", "3", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 inputs = 6 written + 1 error; 6 rows, 12 tokens, " in done.stdout
    assert (
        "Progress bars disabled" not in done.stdout + done.stderr
    )  # Ray Data's notice: ours replace its bars
    t = tables.TokenTable(str(out))
    assert t.manifest.totals == {"inputs": 7, "rows": 6, "errors": 1}
    assert t.label_names == ["0", "1"]
    assert sorted(t.read().column("label").to_pylist()) == [0, 0, 0, 1, 1, 1]
    assert [e["kind"] for e in t.errors().to_pylist()] == ["corrupt"]


def test_a_client_without_the_token_is_told_what_is_missing(tmp_path, ray_head):
    """Ray retries a refused token for ~20 s and raises a bare ConnectionError; the CLI ends with
    one line that names the address and the missing setting (exit 2)."""
    (tmp_path / "0.txt").write_text("1 2")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    code = "import ppkit_tokenizer, sys; from maskloom.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "preprocess", str(tmp_path / "0.txt"), "-m", "ppkit_numbers",
            "-o", str(tmp_path / "t"), "--address", ray_head["gcs"], "--no-progress"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr
    assert last.startswith(
        f"maskloom preprocess: error: cannot connect to a Ray cluster at {ray_head['gcs']}: "
    )
    assert last.endswith("needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token: see the README)")
    assert not (tmp_path / "t" / tables.MANIFEST).exists()

import os
import subprocess
import sys


def test_output_to_a_closed_pipe_ends_quietly():
    """`maskloom recipes | head -1`: the reader leaves; the command stops with 141 (128 + SIGPIPE)
    and no BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)  # nobody reads: the first write fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-u", "-m", "maskloom.cli", "recipes"], stdout=w, stderr=subprocess.PIPE, text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        os.close(w)
    assert done.returncode == 141 and done.stderr == ""

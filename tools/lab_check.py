"""`make lab-check`: start `make lab`'s JupyterLab server headless on loopback, ask its status and kernels over
HTTP, stop it. Exits 1 naming what failed. Extra arguments go to `jupyter lab` (the Makefile adds
--allow-root when run as root)."""
import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL = "opensora-cpu"  # installed by the Makefile's lab-env target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def main(extra: list[str]) -> int:
    port, token = free_port(), secrets.token_hex(16)
    command = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", *extra]
    server = subprocess.Popen(command, cwd=REPO / "notebooks", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    base = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                output = server.stdout.read()[-3000:]
                print(f"lab-check: `{' '.join(command[:2])}` exited with {server.returncode}:\n{output}")
                return 1
            try:
                status = get(f"{base}/status?token={token}")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    print("lab-check: the server did not answer on loopback within 90 s")
                    return 1
                time.sleep(1)
        kernels = get(f"{base}/kernelspecs?token={token}")["kernelspecs"]
        if KERNEL not in kernels:
            print(f"lab-check: the server lists kernels {sorted(kernels)}, not the project's {KERNEL!r}")
            return 1
        print(f"lab-check: JupyterLab answered on 127.0.0.1:{port} (started {status.get('started')}), "
              f"kernel {KERNEL!r} listed; stopping it")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

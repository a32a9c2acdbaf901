"""The real gateway daemon (`oakestra-gw serve`) run in a network namespace, with its config,
token, store and log in a state directory of its own: started, waited for, reloaded, stopped
or killed, and asked over its API from inside that namespace. The one daemon runner of the
demo and of every test that needs the daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..core import hosts
from .http import NetnsHttp
from .netns import LabError, Netns

API_PORT = 11022
# What a daemon started from a service manager would inherit and act on; ours must not.
_MANAGER_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def toml(doc: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for a gateway config: tables of strings, numbers, booleans, lists."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))
    out = []
    for section, table in doc.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def gateway_command() -> list[str]:
    """How to run `oakestra-gw` with the interpreter that runs us."""
    script = Path(sys.executable).with_name("oakestra-gw")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from gw.cli import main; sys.exit(main())"]


class GatewayDaemon:
    """`oakestra-gw serve --config DIR/gateway.toml` in namespace `ns`. `config` is the file's
    content as tables (written by the constructor and by `write_config`); with a `token`, it
    is written to DIR/token and named in [api]. `api_host` is where the API is asked when the
    config names no [api] host."""

    def __init__(self, ns: Netns, state: Path, config: dict[str, dict[str, Any]], *,
                 token: str | None = None, api_host: str = "127.0.0.1",
                 drift_watch: bool = True, cwd: Path | None = None):
        self.ns = ns
        self.dir = Path(state)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "gateway.toml"
        self.log_path = self.dir / "daemon.log"
        self.token = token
        self.default_api_host = api_host
        # Off for tests that tamper with the table on purpose and repair it with SIGHUP.
        self.drift_watch = drift_watch
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0
        self.config = {section: dict(table) for section, table in config.items()}
        if token:
            token_file = self.dir / "token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            self.config.setdefault("api", {}).setdefault("token_file", str(token_file))
        self.write_config()

    @property
    def api_host(self) -> str:
        host = self.config.get("api", {}).get("host") or self.default_api_host
        if self.config.get("ha", {}).get("enabled"):
            # In a pair the API's address floats: this node's daemon answers on loopback
            # (Settings.api_node_host), as it does for the CLI on the node.
            return hosts.node_local_extra(host) or host
        return host

    @property
    def api_port(self) -> int:
        return self.config.get("api", {}).get("port", API_PORT)

    def write_config(self, text: str | None = None) -> None:
        self.config_path.write_text(toml(self.config) if text is None else text)

    # -- the process ---------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = 20, env: dict | None = None,
              args: list[str] | None = None, wrap: list[str] | None = None) -> "GatewayDaemon":
        """Start the daemon (`args` replace `serve --config ...`; `wrap` goes before the
        command, e.g. a profiler); with `wait`, return once /api/health answers 200."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.mark_log()
        environ = {k: v for k, v in os.environ.items() if k not in _MANAGER_ENV}
        environ.update(PYTHONUNBUFFERED="1",
                       OAKESTRA_GW_DRIFT_WATCH="1" if self.drift_watch else "0")
        environ.update(env or {})
        with open(self.log_path, "ab") as log:
            # A session of its own: Ctrl-C reaches only the caller, which stops it in order.
            self.proc = self.ns.popen(
                *(wrap or []), *gateway_command(), *(args or ["serve", "--config", str(self.config_path)]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ,
                cwd=self.cwd, start_new_session=True)
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 20) -> None:
        """Until /api/health answers 200; LabError with the log if the daemon exits first or
        `timeout` (which only catches a hang) passes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"the gateway daemon exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")
            try:
                if self.http(timeout=2).get("/api/health").status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError(f"the gateway daemon did not answer /api/health within "
                               f"{timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def reconfigure(self, overrides: dict[str, dict[str, Any]], timeout: float = 20) -> str:
        """Change config keys and reload (SIGHUP), as `systemctl reload` does. Returns the
        reload's last log line once the daemon has applied (or refused) the new file."""
        for section, table in overrides.items():
            self.config.setdefault(section, {}).update(table)
        self.write_config()
        done = self._reloads()
        self.send(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reloads() == done:
            if time.monotonic() > deadline:
                raise LabError(f"the daemon did not finish a reload within {timeout:g} s:\n"
                               f"{self.log_tail()}")
            time.sleep(0.05)
        return [line for line in self.log().splitlines() if "reload:" in line][-1]

    def _reloads(self) -> int:
        """Finished reloads so far: each ends with the reconcile's line."""
        text = self.log()
        return text.count("reconcile: ") + text.count("reconcile failed")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Send `sig` and reap; a daemon still running after `timeout` is killed and the
        stop fails (it ignored the signal)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LabError(f"the daemon ignored signal {sig}:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    # -- its log -------------------------------------------------------------------------------

    def log(self, since_start: bool = False) -> str:
        """The log, all of it or what the last start wrote."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[self._log_offset if since_start else 0:].decode(errors="replace")

    def mark_log(self) -> None:
        """From here on, `log(since_start=True)` and `wait_log` see only what comes next."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"

    def wait_log(self, text: str, timeout: float = 10) -> str:
        """The log since the last start, once it holds `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log(since_start=True)
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log()}")

    # -- its API -------------------------------------------------------------------------------

    def http(self, token: str | None | bool = True, **kw) -> NetnsHttp:
        """A client of the API from inside the daemon's namespace; `token` True is ours."""
        kw.setdefault("host", self.api_host)
        kw.setdefault("port", self.api_port)
        return NetnsHttp(self.ns.name, token=self.token if token is True else (token or None),
                         **kw)

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = "",
                timeout: float = 10, host: str | None = None) -> tuple[int, Any]:
        """One request, at `host` (default: where it was started to listen); `token` "" is
        ours, None sends none. Returns (status, parsed JSON or text)."""
        answer = self.http(token=True if token == "" else token, timeout=timeout,
                           host=host or self.api_host).request(method, path, body)
        return answer.status, answer.parsed()

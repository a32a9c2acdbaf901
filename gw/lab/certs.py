"""Throw-away TLS material for the lab: a CA, and certificates it signs for a server at an IP
address (its subjectAltName) and for clients. Made with the openssl command, valid two days."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class LabCA:
    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path, name: str = "lab cluster CA") -> LabCA:
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(directory)
        ca._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={name}", "-keyout", "ca.key", "-out", "ca.pem")
        return ca

    def issue(self, name: str, *, ip: str | None = None, more_ips: tuple[str, ...] = (),
              usages: tuple[str, ...] = ("serverAuth",)) -> Pair:
        """A certificate for `name` (files `name`.pem and `name`.key), for a server at `ip`
        (and at `more_ips`, e.g. loopback for a server that listens there too) and/or for a
        client (`usages`: extended key usages, serverAuth and/or clientAuth)."""
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                      "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ips = [a for a in (ip, *more_ips) if a]
        ext = [f"subjectAltName = {', '.join(f'IP:{a}' for a in ips)}"] if ips else []
        ext.append(f"extendedKeyUsage = {', '.join(usages)}")
        (self.directory / f"{name}.ext").write_text("\n".join(ext) + "\n")
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
                      "ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                      "-out", f"{name}.pem")
        return Pair(self.directory / f"{name}.pem", self.directory / f"{name}.key")

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.directory)

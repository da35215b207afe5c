"""Dovecot 2.3 beside runpop3 and runlmtp in the same run: the reference the ratios are taken to.

Debian's ``dovecot-core``, ``dovecot-pop3d`` and ``dovecot-lmtpd``, started in the foreground
(``dovecot -F``) from a configuration written to a directory of the run's own: its own
``base_dir`` and state directory, POP3, POP3S and LMTP on free loopback ports, the bench's
self-signed certificate, a passwd-file with the same users (see ``bench.maildirs``), and the
fleet's Maildirs with the same messages and UIDs. No system service is used or touched.

Dovecot as shipped, but for what a benchmark needs: no login or connection limits below the
bench's, and its authentication ``{PLAIN}`` (``passwd-plain``) beside runpop3's warm scenarios:
Dovecot's auth cache still verifies an argon2 hash at every login, which would make its RETR
and warm-login figures argon2's, while runpop3 logs in from its warm cache (an HMAC and a row
read); issue 14 compares warm logins with Dovecot's ``{PLAIN}`` likewise. Beside runpop3's
cold logins it reads ``passwd``, the same argon2 hashes runpop3 checks, as ``{ARGON2ID}``.
"""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import CLOCK_TICKS, HOST, free_port

DOVECOT = "/usr/sbin/dovecot"
# The protocol binaries Debian's packages install; without them Dovecot's side is skipped.
REQUIRED = ("/usr/lib/dovecot/pop3", "/usr/lib/dovecot/pop3-login", "/usr/lib/dovecot/lmtp")
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# The passwd-files bench.maildirs writes: {PLAIN} passwords, and the users' argon2 hashes.
PLAIN_PASSWORDS, ARGON2_HASHES = "passwd-plain", "passwd"
# Mail processes may not run as root: as root, the mail is owned by this user.
MAIL_USER_AS_ROOT = "nobody"

CONFIG = """\
# Written by the bench for one run; see bench/dovecot.py.
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = bench-{instance}
protocols = pop3 lmtp
listen = {host}
log_path = {log}
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:{mail_root}/%u/Maildir
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
  default_fields = uid={uid} gid={gid} home={mail_root}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {pop3s_port}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def missing() -> str:
    """Why Dovecot's side cannot run here, or "" when it can."""
    absent = [path for path in (DOVECOT, *REQUIRED) if not Path(path).exists()]
    if absent:
        return (
            f"Dovecot not installed ({', '.join(absent)} missing): "
            "apt-get install dovecot-core dovecot-pop3d dovecot-lmtpd"
        )
    return ""


def _accounts() -> tuple[str, str, int, int]:
    """(login user, internal user, mail uid, mail gid): Dovecot's own users when run as root,
    else everything as the user running the bench."""
    if os.geteuid() == 0:
        mail = pwd.getpwnam(MAIL_USER_AS_ROOT)
        return "dovenull", "dovecot", mail.pw_uid, mail.pw_gid
    me = pwd.getpwuid(os.geteuid())
    return me.pw_name, me.pw_name, me.pw_uid, me.pw_gid


@dataclass
class Dovecot:
    """A running Dovecot master and what /proc says about it and every process it started."""

    process: subprocess.Popen
    root: Path
    ports: dict[str, int]
    log_path: Path
    name: str = "dovecot"
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr_path(self) -> Path:
        return self.log_path

    def worker_count(self) -> int:
        return 1  # warm-ups: one login per mailbox builds its index

    @classmethod
    def start(cls, root: Path, certificate: tuple[Path, Path], passwd: str = PLAIN_PASSWORDS) -> "Dovecot":
        """Start Dovecot on what ``bench.maildirs`` wrote to ``root`` (see :func:`make_root`),
        logging users in with the passwd-file ``passwd`` there (:data:`PLAIN_PASSWORDS` or
        :data:`ARGON2_HASHES`)."""
        login_user, internal_user, uid, gid = _accounts()
        mail_root = root / "mail"
        for path in [mail_root, *mail_root.rglob("*")]:
            os.chown(path, uid, gid)
        ports = {"plain": free_port(), "tls": free_port(), "lmtp": free_port()}
        config = root / "dovecot.conf"
        config.write_text(
            CONFIG.format(
                base_dir=root / "run",
                state_dir=root / "state",
                instance=os.getpid(),
                host=HOST,
                log=root / "dovecot.log",
                cert=certificate[0],
                key=certificate[1],
                login_user=login_user,
                internal_user=internal_user,
                uid=uid,
                gid=gid,
                mail_root=mail_root,
                passwd=root / passwd,
                pop3_port=ports["plain"],
                pop3s_port=ports["tls"],
                lmtp_port=ports["lmtp"],
            )
        )
        (root / "state").mkdir(exist_ok=True)
        with (root / "stderr").open("wb") as stderr:
            process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        dovecot = cls(
            process, root, ports, root / "dovecot.log", settings={"config": str(config), "passwd": passwd}
        )
        dovecot._await_listeners()
        return dovecot

    def _await_listeners(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(_accepts(port) for port in self.ports.values()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"dovecot did not start:\n{self.problems_text()}")
            time.sleep(0.1)

    def problems_text(self) -> str:
        texts = [
            path.read_text(errors="replace")
            for path in (self.root / "stderr", self.log_path)
            if path.exists()
        ]
        return "\n".join(texts)[-4000:]

    def problems(self) -> list[str]:
        return [line for line in self.problems_text().splitlines() if "Error" in line or "Fatal" in line]

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the master and every process below it, living or reaped.

        Dovecot starts a process per login and per session; a process that ended was reaped
        by its parent, whose cutime/cstime then hold its CPU.
        """
        user = system = 0
        for pid in [self.pid, *_descendants(self.pid)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):  # gone, or exiting as it is read
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            user += int(fields[11]) + int(fields[13])  # utime, cutime
            system += int(fields[12]) + int(fields[14])  # stime, cstime
        return user / CLOCK_TICKS, system / CLOCK_TICKS

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def make_root() -> Path:
    """A directory of Dovecot's own for one run, outside the project's private ``var/`` (the
    mail user must reach it); ``bench.maildirs`` fills it, :func:`remove_root` removes it."""
    root = Path(tempfile.mkdtemp(prefix="bench-dovecot-"))
    root.chmod(0o755)
    return root


def remove_root(root: Path, keep_log_in: Path) -> None:
    """Keep Dovecot's log with the run's other output; remove the rest (a copy of the fleet)."""
    for name in ("dovecot.log", "stderr", "dovecot.conf"):
        if (root / name).exists():
            shutil.copy(root / name, keep_log_in / f"dovecot-{name}")
    shutil.rmtree(root, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
            found += children
            pending += children
    return found


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True

"""Dovecot's CPU figure skips a process that exits while its /proc entry is being read."""

import os
from pathlib import Path
from types import SimpleNamespace

from bench import dovecot
from bench.servers import CLOCK_TICKS


def test_a_process_exiting_as_it_is_read_is_left_out(monkeypatch):
    exiting = 999_999_999
    real_read_text = Path.read_text

    def read_text(path, *args, **kwargs):
        if path == Path(f"/proc/{exiting}/stat"):
            raise ProcessLookupError(3, "No such process")
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(dovecot, "_descendants", lambda pid: [exiting])
    server = object.__new__(dovecot.Dovecot)
    server.process = SimpleNamespace(pid=os.getpid())
    fields = real_read_text(Path(f"/proc/{os.getpid()}/stat")).rsplit(")", 1)[1].split()
    user, system = server.cpu_times()
    assert user >= (int(fields[11]) + int(fields[13])) / CLOCK_TICKS
    assert system >= (int(fields[12]) + int(fields[14])) / CLOCK_TICKS

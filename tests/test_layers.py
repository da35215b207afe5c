"""The layering of DESIGN.md: pop3/ never imports Django or the project; the protocol cores do no I/O."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
POP3_DIR = PROJECT_DIR / "pop3"
POP3_MODULES = sorted(POP3_DIR.glob("*.py"))
POP3_TESTS = sorted((POP3_DIR / "tests").glob("*.py"))

FORBIDDEN_IN_POP3 = {"django", "channels", "mailadmin"}
FORBIDDEN_IN_PROTOCOL = {"asyncio", "socket", "ssl", "selectors", "threading", "time", *FORBIDDEN_IN_POP3}
LMTP_PROTOCOL = PROJECT_DIR / "mailadmin" / "mailin" / "lmtp" / "protocol.py"


def imported_roots(path: Path) -> set[str]:
    """Top-level package names imported anywhere in the module (also inside functions)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_every_import_form(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text(
        "import os.path\nimport a, b as c\nfrom d.e import f\nfrom . import g\nfrom .h import i\n"
        "def late():\n    import django.conf\n"
    )
    assert imported_roots(module) == {"os", "a", "b", "d", "django"}


def test_pop3_package_has_the_expected_modules():
    assert {path.name for path in POP3_MODULES} >= {
        "__init__.py",
        "protocol.py",
        "mailbox.py",
        "session.py",
        "server.py",
    }


@pytest.mark.parametrize("path", POP3_MODULES, ids=lambda path: path.name)
def test_pop3_module_imports_no_django_channels_or_mailadmin(path: Path):
    assert imported_roots(path) & FORBIDDEN_IN_POP3 == set()


@pytest.mark.parametrize("path", POP3_TESTS, ids=lambda path: path.name)
def test_pop3_tests_import_no_django_channels_or_mailadmin(path: Path):
    """The library's own tests run without Django (make test runs them with pytest-django off)."""
    assert imported_roots(path) & FORBIDDEN_IN_POP3 == set()


def test_the_pop3_tests_are_there():
    assert {path.name for path in POP3_TESTS} >= {"test_protocol.py", "test_session.py", "test_server.py"}


def test_protocol_core_imports_no_io_or_clock():
    assert imported_roots(POP3_DIR / "protocol.py") & FORBIDDEN_IN_PROTOCOL == set()


def test_importing_pop3_loads_no_django_channels_or_mailadmin():
    code = (
        "import pop3.server, pop3.session, pop3.protocol, pop3.mailbox, sys; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'django', 'mailadmin', 'channels'}); "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_lmtp_protocol_core_imports_no_io_clock_or_django():
    assert imported_roots(LMTP_PROTOCOL) & (FORBIDDEN_IN_PROTOCOL - {"mailadmin"}) == set()


def test_importing_the_lmtp_protocol_core_loads_no_django_asyncio_or_socket():
    code = (
        "import mailadmin.mailin.lmtp.protocol, sys; "
        "io = {'django', 'asyncio', 'socket', 'ssl'}; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in io); "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")

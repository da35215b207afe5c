"""Languages: the admin follows the browser, the Indonesian catalogue covers our strings and its
compiled form matches it, and quota warnings speak the domain's language."""

import json
import os
import shutil
import subprocess
import sys

import polib
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

from mailadmin.hosting import services, store
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.store import iter_message_bytes
from mailadmin.mailin.delivery import deliver
from mailadmin.models import AuditEntry, Domain, Message
from tests.conftest import PROJECT_DIR

CATALOGUE = PROJECT_DIR / "locale" / "id" / "LC_MESSAGES" / "django.po"
COMPILED = CATALOGUE.with_suffix(".mo")


@pytest.fixture
def root_client(client, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.test", "pw"))
    return client


def translations(catalogue) -> dict:
    """``{(context, msgid): msgstr or plural forms}`` of a polib catalogue's translated entries."""
    table = {}
    for entry in catalogue.translated_entries():
        translated = tuple(sorted(entry.msgstr_plural.items())) if entry.msgid_plural else entry.msgstr
        table[(entry.msgctxt, entry.msgid)] = translated
    return table


# --- The admin follows the browser -------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_follows_the_browsers_language(root_client, make_mailbox):
    make_mailbox("a@example.test", quota_bytes=1000)
    indonesian = root_client.get("/admin/mailadmin/mailbox/", HTTP_ACCEPT_LANGUAGE="id").content.decode()
    assert '<html lang="id"' in indonesian
    assert "Pemakaian" in indonesian  # our column header, from our catalogue
    assert "0 B dari 1000 B (0%)" in indonesian  # our usage text
    assert "Tangguhkan kotak surat yang dipilih (sesinya berakhir)" in indonesian  # our action
    english = root_client.get("/admin/mailadmin/mailbox/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert '<html lang="en"' in english
    assert "0 B of 1000 B (0%)" in english
    assert "Pemakaian" not in english


@pytest.mark.django_db
def test_a_service_refusal_reaches_the_form_in_the_browsers_language(client, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    services.create_domain(Actor.cli(), "a.test")
    services.create_domain(Actor.cli(), "b.test")
    services.save_domain_administrator(Actor.cli(), "alma", ["a.test"], "a long admin passphrase")
    client.force_login(get_user_model().objects.get(username="alma"))
    form = {
        "address": "x@b.test",
        "password": "a good long password",
        "quota_bytes": "0",
        "quota_messages": "0",
    }
    page = client.post("/admin/mailadmin/mailbox/add/", form, HTTP_ACCEPT_LANGUAGE="id").content.decode()
    assert "tidak diizinkan: b.test bukan domain yang Anda kelola" in page


def test_locale_middleware_sits_after_sessions_and_before_common():
    middleware = settings.MIDDLEWARE
    locale = middleware.index("django.middleware.locale.LocaleMiddleware")
    assert middleware.index("django.contrib.sessions.middleware.SessionMiddleware") < locale
    assert locale < middleware.index("django.middleware.common.CommonMiddleware")


def settings_in_child(tmp_path, **environment: str) -> subprocess.CompletedProcess:
    script = (
        "import json, django; from django.conf import settings; django.setup(); "
        "print(json.dumps([settings.LANGUAGE_CODE, [code for code, _ in settings.LANGUAGES]]))"
    )
    env = {key: value for key, value in os.environ.items() if key != "LANGUAGES"}
    env.update(DJANGO_SETTINGS_MODULE="mailadmin.settings", MAILADMIN_VAR_DIR=str(tmp_path), DEBUG="1")
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def test_languages_come_from_the_environment_english_and_indonesian_by_default(tmp_path):
    default = settings_in_child(tmp_path)
    assert json.loads(default.stdout) == ["en", ["en", "id"]], default.stderr
    chosen = settings_in_child(tmp_path, LANGUAGES="id, en")
    assert json.loads(chosen.stdout) == ["id", ["id", "en"]], chosen.stderr
    unknown = settings_in_child(tmp_path, LANGUAGES="en,klingon")
    assert unknown.returncode != 0
    assert "LANGUAGES names codes Django does not know: klingon" in unknown.stderr


# --- The catalogue -----------------------------------------------------------------------------


def test_the_catalogue_translates_every_entry_it_has():
    catalogue = polib.pofile(str(CATALOGUE))
    assert [entry.msgid for entry in catalogue.untranslated_entries()] == []
    assert [entry.msgid for entry in catalogue.fuzzy_entries()] == []
    assert catalogue.metadata["Language"] == "id"


def test_the_compiled_catalogue_matches_its_source():
    """The committed .mo is what ``make messages`` compiles from the .po, so running needs no gettext."""
    source = translations(polib.pofile(str(CATALOGUE)))
    compiled = translations(polib.mofile(str(COMPILED)))
    assert compiled == source


@pytest.mark.skipif(
    shutil.which("xgettext") is None, reason="gettext's xgettext is not installed (make system-deps)"
)
def test_the_catalogue_covers_every_string_marked_for_translation(tmp_path, monkeypatch, settings):
    """``make messages`` run on a copy of the sources, into a scratch folder, finds nothing new."""
    sources = tmp_path / "src"
    for folder in ("mailadmin", "templates"):
        shutil.copytree(PROJECT_DIR / folder, sources / folder, ignore=shutil.ignore_patterns("__pycache__"))
    scratch = tmp_path / "locale"
    scratch.mkdir()
    settings.LOCALE_PATHS = [str(scratch)]
    monkeypatch.chdir(sources)
    call_command("makemessages", locale=["id"], verbosity=0)
    found = {entry.msgid for entry in polib.pofile(str(scratch / "id" / "LC_MESSAGES" / "django.po"))}
    translated = {msgid for _, msgid in translations(polib.pofile(str(CATALOGUE)))}
    assert sorted(found - translated) == []
    assert len(found) > 150


# --- Quota warnings in the domain's language ---------------------------------------------------


def warning_text(mailbox) -> str:
    warning = Message.objects.for_maildrop(mailbox).get(
        envelope_sender="", from_header__startswith="postmaster@"
    )
    return b"".join(iter_message_bytes(warning.pk)).decode()


@pytest.mark.django_db
def test_a_quota_warning_is_written_in_the_domains_language(make_mailbox):
    make_mailbox("budi@contoh.test", quota_bytes=1000)
    make_mailbox("ann@example.test", quota_bytes=1000)
    services.update_domain(Actor.cli(), "contoh.test", language="id")
    deliver(["budi@contoh.test", "ann@example.test"], [b"Subject: big\n\n" + b"x" * 800 + b"\n"])
    indonesian = warning_text(store.get_mailbox("budi@contoh.test"))
    assert "Subject: Kotak surat Anda sudah 80% penuh\r\n" in indonesian
    assert "Kotak surat Anda budi@contoh.test memakai " in indonesian
    assert "Bila sudah penuh, surat baru akan ditolak." in indonesian
    english = warning_text(store.get_mailbox("ann@example.test"))
    assert "Subject: Your mailbox is 80% full\r\n" in english
    assert "Your mailbox ann@example.test uses " in english


@pytest.mark.django_db
def test_an_operators_own_warning_text_is_sent_as_written(make_mailbox, settings):
    settings.MAILADMIN_QUOTA_WARNING_SUBJECT = "Peringatan kuota {percent}%"
    make_mailbox("budi@contoh.test", quota_bytes=1000)
    services.update_domain(Actor.cli(), "contoh.test", language="en")
    deliver(["budi@contoh.test"], [b"Subject: big\n\n" + b"x" * 800 + b"\n"])
    assert "Subject: Peringatan kuota 80%\r\n" in warning_text(store.get_mailbox("budi@contoh.test"))


@pytest.mark.django_db
def test_a_domains_language_is_set_through_the_admin_and_audited(root_client):
    domain = services.create_domain(Actor.cli(), "contoh.test")
    assert domain.language == "en"
    form = {
        "active": "on",
        "quota_bytes": "0",
        "max_mailboxes": "0",
        "max_aliases": "0",
        "default_mailbox_quota_bytes": "0",
        "quota_warning_percents": "",
        "language": "id",
    }
    response = root_client.post(f"/admin/mailadmin/domain/{domain.pk}/change/", form)
    assert response.status_code == 302
    assert Domain.objects.get(pk=domain.pk).language == "id"
    assert AuditEntry.objects.get(actor_name="root").changes == {"language": ["en", "id"]}
    response = root_client.post(f"/admin/mailadmin/domain/{domain.pk}/change/", form | {"language": "xx"})
    assert response.status_code == 200
    assert Domain.objects.get(pk=domain.pk).language == "id"


@pytest.mark.django_db
def test_the_service_refuses_a_language_not_configured():
    services.create_domain(Actor.cli(), "contoh.test")
    with pytest.raises(store.InvalidInput, match="unknown language 'fr'"):
        services.update_domain(Actor.cli(), "contoh.test", language="fr")

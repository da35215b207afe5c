"""Domain administrators in the admin: made by superusers only, and kept out of other domains by every URL.

The walk below visits every page of every model registered in the admin (changelist, change,
delete, history, each page a model admin adds, each action, the autocomplete endpoint and the
admin's object shortcut) as the administrator of a.test, aimed at b.test's objects, and
expects a refusal and not one changed row. A model registered later without a b.test object
here fails ``test_every_registered_model_is_walked`` until it is added to ``b_objects``.
"""

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.forms.models import model_to_dict
from django.utils import timezone, translation

from mailadmin.api.models import ApiToken
from mailadmin.hosting import aliases, services
from mailadmin.hosting.actors import Actor
from mailadmin.mailin.delivery import deliver
from mailadmin.models import (
    Alias,
    AliasDestination,
    AliasDomain,
    AuditEntry,
    AuthFailure,
    Domain,
    DomainAdministrator,
    DomainAdministratorLogin,
    DomainCatchAll,
    Mailbox,
    Message,
    Pop3Session,
)
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db

REFUSED = {403, 404, 405}
PASSPHRASE = "a long admin passphrase"


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def b_objects(make_mailbox) -> dict:
    """One object of b.test (or out of a.test's reach) per registered model, with a.test's beside."""
    services.create_domain(Actor.cli(), "a.test")
    services.create_domain(Actor.cli(), "b.test")
    services.save_domain_administrator(Actor.cli(), "alma", ["a.test"], PASSPHRASE)
    services.save_domain_administrator(Actor.cli(), "bert", ["b.test"], PASSPHRASE)
    objects = {}
    for domain in ("a.test", "b.test"):
        mailbox = make_mailbox(f"user@{domain}")
        deliver([mailbox.address], [f"Subject: for {domain}\n\nbody of {domain}\n".encode()])
        open_session_row(mailbox)
        AuthFailure.objects.create(
            created_at=timezone.now(),
            username=mailbox.address,
            domain=mailbox.domain,
            peer_host="192.0.2.9",
            source="192.0.2.9",
            mechanism="USER",
            reason="bad password",
        )
    b_mailbox = Mailbox.objects.get(user__username="user@b.test")
    objects[Domain] = b_mailbox.domain
    objects[Mailbox] = b_mailbox
    objects[Message] = Message.objects.get(mailbox=b_mailbox)
    objects[Pop3Session] = Pop3Session.objects.get(mailbox=b_mailbox)
    objects[AuthFailure] = AuthFailure.objects.get(domain=b_mailbox.domain)
    objects[AuditEntry] = AuditEntry.objects.filter(domain=b_mailbox.domain).first()
    objects[DomainAdministratorLogin] = DomainAdministratorLogin.objects.get(username="bert")
    objects[get_user_model()] = b_mailbox.user
    objects[Group] = Group.objects.get(name=services.ADMINISTRATORS_GROUP)
    objects[ApiToken] = services.create_token(Actor.cli(), domain_names=["b.test"], name="provisioning").token
    for domain in ("a.test", "b.test"):
        aliases.create_alias(Actor.cli(), f"team@{domain}", [f"user@{domain}"])
        aliases.set_catch_all(Actor.cli(), domain, [f"user@{domain}"])
        aliases.create_alias_domain(Actor.cli(), f"alias-{domain}", domain)
    objects[Alias] = Alias.objects.get(source="team@b.test")
    objects[DomainCatchAll] = DomainCatchAll.objects.get(source="@b.test")
    objects[AliasDomain] = AliasDomain.objects.get(name="alias-b.test")
    return objects


@pytest.fixture
def alma(client, b_objects):
    client.force_login(get_user_model().objects.get(username="alma"))
    return client


def snapshot() -> dict:
    """Every row a refused request must leave as it was (in English: a row's text names its
    model in the active language, which the requests walked may have changed)."""
    with translation.override("en"):
        return _rows()


def _rows() -> dict:
    models = [
        Domain,
        Mailbox,
        Message,
        Pop3Session,
        AuthFailure,
        AuditEntry,
        DomainAdministrator,
        Group,
        ApiToken,
        Alias,
        AliasDestination,
        AliasDomain,
    ]
    rows = {
        model.__name__: sorted(map(repr, (model_to_dict(row) for row in model.objects.all())))
        for model in models
    }
    users = (
        get_user_model().objects.order_by("pk").values_list("username", "password", "is_active", "is_staff")
    )
    return {**rows, "users": list(users)}


def object_urls(model_admin) -> list[tuple[str, str]]:
    """(name, route) of each of the model admin's URLs that take an object id."""
    return [
        (pattern.name, str(pattern.pattern))
        for pattern in model_admin.get_urls()
        if "object_id" in str(pattern.pattern)
    ]


def test_every_registered_model_is_walked(b_objects):
    assert set(admin.site._registry) == set(b_objects)


def test_an_a_test_administrator_is_refused_every_b_test_object_by_every_url(alma, b_objects):
    superuser = _request_as("root")
    before = snapshot()
    visited = []
    for model, model_admin in admin.site._registry.items():
        target = b_objects[model]
        base = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        for name, route in object_urls(model_admin):
            url = base + route.replace("<path:object_id>", str(target.pk))
            for method in (alma.get, alma.post):
                response = method(url, follow=True)
                assert response.status_code in REFUSED, (url, method.__name__, response.status_code)
                assert "b.test" not in response.content.decode(), url
            visited.append(name or route)
        for action in model_admin.get_actions(superuser) or ["delete_selected"]:
            form = {"action": action, "_selected_action": [str(target.pk)], "post": "yes"}
            response = alma.post(base, form, follow=True)
            assert "b.test" not in response.content.decode(), (base, action)
        response = alma.get(base)
        assert response.status_code in {200} | REFUSED
        assert "b.test" not in response.content.decode(), base
        content_type = ContentType.objects.get_for_model(model, for_concrete_model=False)
        assert alma.get(f"/admin/r/{content_type.pk}/{target.pk}/").status_code == 404
    assert snapshot() == before
    assert not AuditEntry.objects.filter(actor_name="alma").exists()
    assert {"mailadmin_mailbox_password", "mailadmin_mailbox_suspend", "mailadmin_message_body"} <= set(
        visited
    )


def _request_as(username: str):
    """A request of a superuser, to list every action a model admin can offer anyone."""
    from django.test import RequestFactory

    request = RequestFactory().get("/admin/")
    request.user = get_user_model().objects.get_or_create(
        username=username, is_superuser=True, is_staff=True
    )[0]
    return request


def test_autocomplete_reveals_no_b_test_object(alma, b_objects):
    for model in admin.site._registry:
        for field in model._meta.get_fields():
            if not (field.is_relation and field.concrete and field.related_model in admin.site._registry):
                continue
            query = {
                "app_label": model._meta.app_label,
                "model_name": model._meta.model_name,
                "field_name": field.name,
                "term": "b",
            }
            response = alma.get("/admin/autocomplete/", query)
            assert response.status_code in {200} | REFUSED, query
            assert "b.test" not in response.content.decode(), query


def test_the_a_test_administrator_still_reaches_their_own_objects(alma, b_objects):
    ours = Mailbox.objects.get(user__username="user@a.test")
    assert alma.get(f"/admin/mailadmin/mailbox/{ours.pk}/change/").status_code == 200
    assert alma.get(f"/admin/mailadmin/mailbox/{ours.pk}/history/").status_code == 200
    assert alma.get(f"/admin/mailadmin/mailbox/{ours.pk}/password/").status_code == 200
    message = Message.objects.get(mailbox=ours)
    assert alma.get(f"/admin/mailadmin/message/{message.pk}/change/").status_code == 200
    assert "user@a.test" in alma.get("/admin/mailadmin/mailbox/").content.decode()


# --- Superusers make domain administrators ---------------------------------------------------


@pytest.fixture
def root(client, b_objects):
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.test", "pw"))
    return client


def administrator_form(username: str, domains: list[Domain], password: str = "") -> dict:
    return {
        "username": username,
        "domains": [str(domain.pk) for domain in domains],
        "password1": password,
        "password2": password,
    }


def test_a_superuser_makes_a_domain_administrator_through_the_service(root, b_objects):
    a, b = Domain.objects.get(name="a.test"), Domain.objects.get(name="b.test")
    response = root.post(
        "/admin/mailadmin/domainadministratorlogin/add/", administrator_form("carla", [a, b], PASSPHRASE)
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    carla = get_user_model().objects.get(username="carla")
    assert carla.is_staff and not carla.is_superuser
    assert carla.check_password(PASSPHRASE)
    assert sorted(carla.administered_domains.values_list("domain__name", flat=True)) == ["a.test", "b.test"]
    assert carla.has_perm("mailadmin.set_mailbox_password")
    assert not carla.has_perm("mailadmin.view_message_body")
    entry = AuditEntry.objects.get(actor_name="root")
    assert (entry.action, entry.object_type, entry.object_name, entry.changes) == (
        "create",
        "administrator",
        "carla",
        {"password": "changed", "domains": [None, ["a.test", "b.test"]]},
    )
    page = root.get("/admin/mailadmin/domainadministratorlogin/").content.decode()
    assert "carla" in page and "a.test, b.test" in page
    assert "user@b.test" not in page


def test_a_superuser_changes_an_administrators_domains_keeping_the_password(root, b_objects):
    a = Domain.objects.get(name="a.test")
    bert = DomainAdministratorLogin.objects.get(username="bert")
    url = f"/admin/mailadmin/domainadministratorlogin/{bert.pk}/change/"
    assert root.post(url, administrator_form("ignored", [a])).status_code == 302
    bert = get_user_model().objects.get(pk=bert.pk)
    assert bert.check_password(PASSPHRASE)
    assert list(bert.administered_domains.values_list("domain__name", flat=True)) == ["a.test"]
    assert AuditEntry.objects.get(actor_name="root").changes == {"domains": [["b.test"], ["a.test"]]}


def test_a_new_administrator_needs_matching_passwords_and_a_domain(root, b_objects):
    a = Domain.objects.get(name="a.test")
    add = "/admin/mailadmin/domainadministratorlogin/add/"
    form = administrator_form("dora", [a], PASSPHRASE) | {"password2": "something else entirely"}
    assert root.post(add, form).context["adminform"].form.non_field_errors() == ["The two passwords differ."]
    response = root.post(add, administrator_form("user@a.test", [a], PASSPHRASE))
    assert "a mailbox&#x27;s login" in response.content.decode()
    response = root.post(add, administrator_form("dora", [], PASSPHRASE))
    assert response.status_code == 200
    assert not get_user_model().objects.filter(username="dora").exists()


def test_a_superuser_deletes_an_administrator_through_the_service(root, b_objects):
    bert = DomainAdministratorLogin.objects.get(username="bert")
    response = root.post(f"/admin/mailadmin/domainadministratorlogin/{bert.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not get_user_model().objects.filter(username="bert").exists()
    entry = AuditEntry.objects.get(actor_name="root")
    assert (entry.action, entry.object_name, entry.changes) == (
        "delete",
        "bert",
        {"domains": [["b.test"], None]},
    )


def test_only_superusers_see_domain_administrators(alma, b_objects):
    assert alma.get("/admin/mailadmin/domainadministratorlogin/").status_code == 403
    assert alma.get("/admin/mailadmin/domainadministratorlogin/add/").status_code == 403
    assert "domainadministratorlogin" not in alma.get("/admin/").content.decode()


def test_migrate_gives_existing_administrators_permissions_added_since(b_objects):
    group = Group.objects.get(name=services.ADMINISTRATORS_GROUP)
    group.permissions.remove(
        *group.permissions.filter(codename__in=["set_mailbox_password", "suspend_mailbox"])
    )
    call_command("migrate", verbosity=0)
    granted = set(group.permissions.values_list("codename", flat=True))
    assert granted == set(services.ADMINISTRATOR_PERMISSIONS)
    assert get_user_model().objects.get(username="bert").has_perm("mailadmin.suspend_mailbox")

"""Aliases, catch-alls and alias domains: the expansion rule, the rules on saving, scope and audit."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from mailadmin.hosting import aliases, expansion, postfixmap, scopes, services, store
from mailadmin.hosting.actors import Actor
from mailadmin.models import Alias, AliasDailyCount, AliasDestination, AliasDomain, AuditEntry, DomainCatchAll

pytestmark = pytest.mark.django_db

CLI = Actor.cli()


@pytest.fixture(autouse=True)
def cheap_hashes(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def ours(make_mailbox):
    """ours.test with the mailboxes ann, bob and cid; theirs.test with tom."""
    for address in ("ann@ours.test", "bob@ours.test", "cid@ours.test", "tom@theirs.test"):
        make_mailbox(address)


@pytest.fixture
def ours_admin(ours):
    services.save_domain_administrator(CLI, "olivia", ["ours.test"], "a long admin passphrase")
    return Actor.for_user(get_user_model().objects.get(username="olivia"), "198.51.100.7")


def expanded(address: str) -> tuple[list[str], list[str], list[str]]:
    """(mailboxes, outside addresses, unknown addresses) ``address`` expands to now."""
    found = expansion.expand(address, store.StoreDirectory())
    return list(found.mailboxes), found.outside, found.unknown


def last_entry() -> AuditEntry:
    return AuditEntry.objects.order_by("-id").first()


# --- Expansion -------------------------------------------------------------------------------


def test_an_alias_expands_to_each_of_its_mailboxes_in_order(ours):
    aliases.create_alias(CLI, "team@ours.test", ["bob@ours.test", "ann@ours.test"])
    assert expanded("team@ours.test") == (["bob@ours.test", "ann@ours.test"], [], [])


def test_a_chain_is_followed_and_a_mailbox_reached_twice_is_listed_once(ours):
    aliases.create_alias(CLI, "sales@ours.test", ["ann@ours.test", "bob@ours.test"])
    aliases.create_alias(CLI, "all@ours.test", ["sales@ours.test", "ann@ours.test", "cid@ours.test"])
    assert expanded("all@ours.test") == (["ann@ours.test", "bob@ours.test", "cid@ours.test"], [], [])
    found = expansion.expand("all@ours.test", store.StoreDirectory())
    assert [Alias.objects.get(pk=pk).source for pk in found.alias_ids] == ["all@ours.test", "sales@ours.test"]


def test_a_mailbox_address_is_the_mailbox_whatever_the_catch_all(ours):
    aliases.set_catch_all(CLI, "ours.test", ["cid@ours.test"])
    assert expanded("ann@ours.test") == (["ann@ours.test"], [], [])
    assert expanded("nobody@ours.test") == (["cid@ours.test"], [], [])


def test_an_alias_wins_over_the_catch_all(ours):
    aliases.set_catch_all(CLI, "ours.test", ["cid@ours.test"])
    aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"])
    assert expanded("info@ours.test") == (["ann@ours.test"], [], [])


def test_an_inactive_alias_is_as_if_absent_and_the_catch_all_takes_its_mail(ours):
    aliases.set_catch_all(CLI, "ours.test", ["cid@ours.test"])
    aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"], active=False)
    assert expanded("info@ours.test") == (["cid@ours.test"], [], [])


def test_without_catch_all_an_unknown_address_is_unknown_and_a_foreign_one_too(ours):
    assert expanded("nobody@ours.test") == ([], [], ["nobody@ours.test"])
    assert expanded("someone@elsewhere.example") == ([], [], ["someone@elsewhere.example"])


def test_an_alias_domain_maps_a_mailbox_and_an_alias_to_the_target(ours):
    aliases.create_alias(CLI, "info@ours.test", ["bob@ours.test"])
    aliases.create_alias_domain(CLI, "ours-alias.test", "ours.test")
    assert expanded("ann@ours-alias.test") == (["ann@ours.test"], [], [])
    assert expanded("info@ours-alias.test") == (["bob@ours.test"], [], [])


def test_an_alias_domain_without_a_matching_address_falls_to_the_targets_catch_all(ours):
    aliases.create_alias_domain(CLI, "ours-alias.test", "ours.test")
    assert expanded("nobody@ours-alias.test") == ([], [], ["nobody@ours.test"])
    aliases.set_catch_all(CLI, "ours.test", ["cid@ours.test"])
    assert expanded("nobody@ours-alias.test") == (["cid@ours.test"], [], [])


def test_outside_destinations_are_listed_for_the_mta(ours):
    aliases.create_alias(CLI, "fwd@ours.test", ["ann@ours.test", "Someone@Remote.Example"])
    assert expanded("fwd@ours.test") == (["ann@ours.test"], ["someone@remote.example"], [])


def test_a_deleted_destination_mailbox_is_skipped_at_expansion(ours):
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    services.delete_mailbox(CLI, "bob@ours.test")
    assert expanded("team@ours.test") == (["ann@ours.test"], [], ["bob@ours.test"])


def test_a_loop_made_by_deleting_a_mailbox_stops_at_delivery_with_the_chain(ours):
    aliases.set_catch_all(CLI, "ours.test", ["ann@ours.test"])
    services.delete_mailbox(CLI, "ann@ours.test")
    with pytest.raises(expansion.AliasLoop) as raised:
        expansion.expand("x@ours.test", store.StoreDirectory())
    assert raised.value.chain == ("x@ours.test", "@ours.test", "ann@ours.test", "@ours.test")


def test_expansion_stops_at_the_fixed_depth(ours):
    chain = [f"hop{n}@ours.test" for n in range(expansion.MAX_DEPTH + 1)]
    aliases.create_alias(CLI, chain[-1], ["ann@ours.test"])
    for source, destination in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
        if source == chain[0]:
            with pytest.raises(store.InvalidInput, match=f"alias chain deeper than {expansion.MAX_DEPTH}"):
                aliases.create_alias(CLI, source, [destination])
        else:
            aliases.create_alias(CLI, source, [destination])
    assert not Alias.objects.filter(source=chain[0]).exists()


# --- Saving: loops, shadowing, limits, destinations ------------------------------------------


def test_an_alias_to_itself_is_refused_as_a_loop(ours):
    with pytest.raises(store.InvalidInput, match=r"alias loop: self@ours.test -> self@ours.test"):
        aliases.create_alias(CLI, "self@ours.test", ["self@ours.test", "ann@ours.test"])
    assert not Alias.objects.exists()


def test_a_chain_coming_back_to_its_start_is_refused_when_saved(ours):
    aliases.create_alias(CLI, "a@ours.test", ["ann@ours.test"])
    aliases.create_alias(CLI, "b@ours.test", ["a@ours.test"])
    with pytest.raises(store.InvalidInput, match=r"a@ours.test -> b@ours.test -> a@ours.test"):
        aliases.update_alias(CLI, "a@ours.test", destinations=["b@ours.test"])
    assert aliases.destinations_of(Alias.objects.get(source="a@ours.test")) == ["ann@ours.test"]


def test_a_catch_alls_local_destination_must_exist(ours):
    with pytest.raises(store.InvalidInput, match="neither a mailbox nor an alias"):
        aliases.set_catch_all(CLI, "ours.test", ["nobody@ours.test"])
    assert not DomainCatchAll.objects.exists()


def test_an_alias_domain_that_turns_a_forward_into_a_loop_is_refused(ours):
    aliases.create_alias(CLI, "back@ours.test", ["back@later.test"])
    with pytest.raises(store.InvalidInput, match="back@ours.test would loop"):
        aliases.create_alias_domain(CLI, "later.test", "ours.test")
    assert not AliasDomain.objects.exists()


def test_an_alias_cannot_take_a_mailboxs_address_nor_a_mailbox_an_aliass(ours, make_mailbox):
    with pytest.raises(store.AlreadyExists, match="ann@ours.test is a mailbox"):
        aliases.create_alias(CLI, "ANN@ours.test", ["bob@ours.test"])
    aliases.create_alias(CLI, "info@ours.test", ["bob@ours.test"])
    with pytest.raises(store.AlreadyExists, match="info@ours.test is an alias"):
        services.create_mailbox(CLI, "Info@OURS.test", password="a good long password")


def test_addresses_are_normalised_and_repeated_destinations_kept_once(ours):
    alias = aliases.create_alias(CLI, " Info@OURS.Test ", ["BOB@ours.test", "bob@ours.test", "ann@ours.test"])
    assert alias.source == "info@ours.test"
    assert aliases.destinations_of(alias) == ["bob@ours.test", "ann@ours.test"]


def test_a_local_destination_must_exist(ours):
    with pytest.raises(store.InvalidInput, match="nobody@ours.test is neither a mailbox nor an alias"):
        aliases.create_alias(CLI, "info@ours.test", ["nobody@ours.test"])


def test_an_address_in_an_alias_domain_is_neither_source_nor_destination(ours):
    aliases.create_alias_domain(CLI, "ours-alias.test", "ours.test")
    with pytest.raises(store.InvalidInput, match="ours-alias.test is an alias domain"):
        aliases.create_alias(CLI, "info@ours-alias.test", ["ann@ours.test"])
    with pytest.raises(store.InvalidInput, match="name ann@ours.test instead"):
        aliases.create_alias(CLI, "info@ours.test", ["ann@ours-alias.test"])


def test_the_domains_alias_limit_counts_aliases_but_not_its_catch_all(ours):
    services.update_domain(CLI, "ours.test", max_aliases=1)
    aliases.set_catch_all(CLI, "ours.test", ["ann@ours.test"])
    aliases.create_alias(CLI, "one@ours.test", ["ann@ours.test"])
    with pytest.raises(store.LimitReached, match="already has its maximum of 1 aliases"):
        aliases.create_alias(CLI, "two@ours.test", ["ann@ours.test"])


def test_alias_domain_names_and_domain_names_never_overlap(ours):
    with pytest.raises(store.AlreadyExists, match="theirs.test is a domain already"):
        aliases.create_alias_domain(CLI, "theirs.test", "ours.test")
    aliases.create_alias_domain(CLI, "other.test", "ours.test")
    with pytest.raises(store.AlreadyExists, match="other.test is an alias domain already"):
        services.create_domain(CLI, "other.test")
    with pytest.raises(store.AlreadyExists, match="other.test is an alias domain already"):
        services.create_mailbox(CLI, "x@other.test", password="a good long password", create_domain=True)


def test_a_domain_with_aliases_is_kept_until_they_are_deleted(make_mailbox):
    services.create_domain(CLI, "empty.test")
    make_mailbox("ann@ours.test")
    aliases.set_catch_all(CLI, "empty.test", ["ann@ours.test"])
    with pytest.raises(store.InvalidInput, match="empty.test still has 1 alias or catch-all"):
        services.delete_domain(CLI, "empty.test")
    aliases.set_catch_all(CLI, "empty.test", None)
    services.delete_domain(CLI, "empty.test")


# --- Audit -----------------------------------------------------------------------------------


def test_each_change_writes_one_audit_entry_with_the_destinations(ours):
    aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"])
    entry = last_entry()
    assert (entry.action, entry.object_type, entry.object_name, entry.domain_name) == (
        "create",
        "alias",
        "info@ours.test",
        "ours.test",
    )
    assert entry.changes == {"destinations": [None, ["ann@ours.test"]], "active": [None, True]}
    aliases.update_alias(CLI, "info@ours.test", destinations=["bob@ours.test"], active=False)
    assert last_entry().changes == {
        "destinations": [["ann@ours.test"], ["bob@ours.test"]],
        "active": [True, False],
    }
    count = AuditEntry.objects.count()
    aliases.update_alias(CLI, "info@ours.test", destinations=["bob@ours.test"])
    assert AuditEntry.objects.count() == count  # nothing changed, nothing recorded
    aliases.delete_alias(CLI, "info@ours.test")
    assert (last_entry().action, last_entry().changes) == (
        "delete",
        {"destinations": [["bob@ours.test"], None]},
    )
    assert not AliasDestination.objects.exists()


def test_save_alias_creates_then_replaces(ours):
    aliases.save_alias(CLI, "info@ours.test", ["ann@ours.test"])
    aliases.save_alias(CLI, "info@ours.test", ["bob@ours.test", "cid@ours.test"], active=False)
    alias = Alias.objects.get(source="info@ours.test")
    assert (aliases.destinations_of(alias), alias.active) == (["bob@ours.test", "cid@ours.test"], False)


# --- Scope of a domain administrator ---------------------------------------------------------


def test_a_domain_administrator_manages_aliases_of_their_domains_only(ours_admin):
    aliases.create_alias(ours_admin, "info@ours.test", ["ann@ours.test"])
    assert last_entry().actor_name == "olivia"
    with pytest.raises(services.NotPermitted, match="theirs.test is not a domain you administer"):
        aliases.create_alias(ours_admin, "info@theirs.test", ["tom@theirs.test"])
    aliases.create_alias(CLI, "sales@theirs.test", ["tom@theirs.test"])
    for change in (
        lambda: aliases.update_alias(ours_admin, "sales@theirs.test", active=False),
        lambda: aliases.delete_alias(ours_admin, "sales@theirs.test"),
        lambda: aliases.delete_alias(ours_admin, "nosuch@theirs.test"),
        lambda: aliases.set_catch_all(ours_admin, "theirs.test", ["ann@ours.test"]),
    ):
        with pytest.raises(services.NotPermitted, match="theirs.test is not a domain you administer"):
            change()
    assert [alias.source for alias in aliases.list_aliases(ours_admin)] == ["info@ours.test"]
    assert list(scopes.visible_to(ours_admin, Alias).values_list("source", flat=True)) == ["info@ours.test"]


def test_a_domain_administrator_points_aliases_only_into_their_domains(ours_admin):
    with pytest.raises(services.NotPermitted, match="theirs.test is not a domain you administer"):
        aliases.create_alias(ours_admin, "info@ours.test", ["tom@theirs.test"])
    assert not Alias.objects.exists()


def test_outside_destinations_need_the_domains_permission_for_its_administrators(ours_admin):
    with pytest.raises(
        services.NotPermitted, match="ours.test does not allow forwarding to outside addresses"
    ):
        aliases.create_alias(ours_admin, "fwd@ours.test", ["someone@remote.example"])
    aliases.create_alias(CLI, "cli-fwd@ours.test", ["someone@remote.example"])  # an operator may
    with pytest.raises(services.NotPermitted, match="only an operator of every domain may change"):
        services.update_domain(ours_admin, "ours.test", allow_outside_destinations=True)
    services.update_domain(CLI, "ours.test", allow_outside_destinations=True)
    aliases.create_alias(ours_admin, "fwd@ours.test", ["someone@remote.example"])


def test_alias_domains_are_made_by_operators_and_seen_by_the_targets_administrators(ours_admin):
    with pytest.raises(
        services.NotPermitted, match="only an operator of every domain may create alias domains"
    ):
        aliases.create_alias_domain(ours_admin, "ours-alias.test", "ours.test")
    aliases.create_alias_domain(CLI, "ours-alias.test", "ours.test")
    aliases.create_alias_domain(CLI, "theirs-alias.test", "theirs.test")
    assert list(scopes.visible_to(ours_admin, AliasDomain).values_list("name", flat=True)) == [
        "ours-alias.test"
    ]
    # an address of an alias domain is no address of theirs, and the refusal says no more
    with pytest.raises(services.NotPermitted, match="theirs-alias.test is not a domain you administer"):
        aliases.create_alias(ours_admin, "x@theirs-alias.test", ["ann@ours.test"])


# --- Import ----------------------------------------------------------------------------------


def test_import_takes_postfixadmin_and_space_separated_destinations_and_forward_references(ours):
    handle = io.StringIO(
        "source,destinations\n"
        'all@ours.test,"team@ours.test,cid@ours.test"\n'
        "team@ours.test,ann@ours.test bob@ours.test\n"
        "@ours.test,cid@ours.test\n"
    )
    created = aliases.import_aliases(CLI, handle)
    assert [alias.source for alias in created] == ["all@ours.test", "team@ours.test", "@ours.test"]
    assert expanded("all@ours.test") == (["ann@ours.test", "bob@ours.test", "cid@ours.test"], [], [])
    assert DomainCatchAll.objects.get().source == "@ours.test"
    assert list(
        AuditEntry.objects.filter(action="import").order_by("id").values_list("object_type", flat=True)
    ) == [
        "alias",
        "alias",
        "catch-all",
    ]


@pytest.mark.parametrize(
    ("rows", "error"),
    [
        (
            "ok@ours.test,ann@ours.test\nbad@ours.test,nobody@ours.test\n",
            "line 3: nobody@ours.test is neither",
        ),
        (
            "ok@ours.test,ann@ours.test\nok@ours.test,bob@ours.test\n",
            "line 3: ok@ours.test is already on line 2",
        ),
        ("ok@ours.test,ann@ours.test\nann@ours.test,bob@ours.test\n", "line 3: ann@ours.test is a mailbox"),
        ("ok@ours.test,ann@ours.test\nx@ours.test,\n", "line 3: an alias needs at least one destination"),
        ("ok@ours.test,ann@ours.test\nloop@ours.test,loop@ours.test\n", "line 3: loop@ours.test refused"),
        ("ok@ours.test,not an address\n", "line 2: 'not' is not an address"),
    ],
)
def test_import_is_all_or_nothing_and_names_the_row(ours, rows, error):
    with pytest.raises(store.StoreError, match=error):
        aliases.import_aliases(CLI, io.StringIO("source,destinations\n" + rows))
    assert not Alias.objects.exists()


def test_import_refuses_a_wrong_header():
    with pytest.raises(store.InvalidInput, match="line 1: the header must be exactly source,destinations"):
        aliases.import_aliases(CLI, io.StringIO("address,goto\n"))


# --- Commands --------------------------------------------------------------------------------


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_the_alias_commands_create_list_replace_and_delete(ours):
    assert run("createalias", "info@ours.test", "ann@ours.test", "bob@ours.test") == (
        "created alias info@ours.test -> ann@ours.test, bob@ours.test\n"
    )
    assert run("setcatchall", "ours.test", "cid@ours.test") == "catch-all @ours.test -> cid@ours.test\n"
    AliasDailyCount.objects.create(
        alias=Alias.objects.get(source="info@ours.test"), day="2000-01-01", messages=9
    )
    assert run("listaliases", "--domain", "ours.test").splitlines() == [
        "source          active  30d  destinations",
        "@ours.test      yes       0  cid@ours.test",
        "info@ours.test  yes       0  ann@ours.test, bob@ours.test",
        "2 aliases",
    ]
    assert run("setcatchall", "ours.test", "--off") == "catch-all of ours.test: off\n"
    assert run("deletealias", "INFO@ours.test") == "deleted alias info@ours.test\n"
    assert not Alias.objects.exists()
    assert run("createaliasdomain", "ours-alias.test", "ours.test") == (
        "created alias domain ours-alias.test -> ours.test\n"
    )


def test_alias_commands_refuse_with_one_line(ours):
    with pytest.raises(CommandError, match="no such alias: nobody@ours.test"):
        run("deletealias", "nobody@ours.test")
    with pytest.raises(CommandError, match="give either destinations or --off"):
        run("setcatchall", "ours.test")
    with pytest.raises(CommandError, match="no such domain: nosuch.test"):
        run("createalias", "x@nosuch.test", "ann@ours.test")


def test_importaliases_command_names_the_row(ours, tmp_path):
    path = tmp_path / "aliases.csv"
    path.write_text("source,destinations\ninfo@ours.test,ann@ours.test\nx@ours.test,nobody@ours.test\n")
    with pytest.raises(CommandError, match="line 3: nobody@ours.test is neither a mailbox nor an alias"):
        run("importaliases", str(path))
    path.write_text("source,destinations\ninfo@ours.test,ann@ours.test\n")
    assert run("importaliases", str(path)) == "imported 1 alias\n"


# --- The Postfix table -----------------------------------------------------------------------


def test_the_postfix_table_maps_mailboxes_to_themselves_aliases_and_alias_domains(ours, tmp_path):
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    aliases.create_alias(CLI, "off@ours.test", ["ann@ours.test"], active=False)
    aliases.set_catch_all(CLI, "ours.test", ["cid@ours.test"])
    aliases.create_alias(CLI, "fwd@theirs.test", ["Someone@Remote.Example"])
    aliases.create_alias_domain(CLI, "ours-alias.test", "ours.test")
    assert list(postfixmap.map_lines()) == [
        "@ours-alias.test @ours.test",
        "@ours.test cid@ours.test",
        "ann@ours-alias.test ann@ours.test",
        "ann@ours.test ann@ours.test",
        "bob@ours-alias.test bob@ours.test",
        "bob@ours.test bob@ours.test",
        "cid@ours-alias.test cid@ours.test",
        "cid@ours.test cid@ours.test",
        "fwd@theirs.test someone@remote.example",
        "team@ours-alias.test team@ours.test",
        "team@ours.test ann@ours.test,bob@ours.test",
        "tom@theirs.test tom@theirs.test",
    ]
    path = tmp_path / "aliases"
    assert (
        run("exportaliases", "--postfix", str(path))
        == f"wrote 12 entries to {path}; now run: postmap {path}\n"
    )
    assert path.read_text().splitlines() == list(postfixmap.map_lines())
    assert run("exportaliases", "--sql-view").startswith(
        "CREATE OR REPLACE VIEW postfix_virtual_aliases AS\nSELECT"
    )

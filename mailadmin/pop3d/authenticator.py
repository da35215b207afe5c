"""POP3 authentication policy over django.contrib.auth.

Order of work for one attempt, as in Dovecot:

1. the per-source penalty (grows with distinct recent failures from the same IPv4 address or
   IPv6 /48, recorded in the database so every runpop3 process sees them) is slept off
   *before* any hashing, so a flood cannot buy verifications. While a source is under penalty,
   its attempts take turns (one at a time per process, the penalty slept inside the turn), so
   the penalty caps its rate however many connections it opens; sources in good standing (many
   customers behind one carrier NAT) are never queued behind each other;
2. ``django.contrib.auth.authenticate`` runs on the small hashing executor, so at most
   POP3_AUTH_THREADS argon2 verifications (~100 MiB each) run at once in this process. It
   hashes for unknown users too and upgrades outdated hashes (an imported Dovecot or PBKDF2
   hash) to argon2 on success, off the event loop (``hosting.authbackend``);
3. the mailbox must be usable (``Mailbox.objects.usable()``): unknown user, wrong password and
   inactive mailbox get the same answer at the same time: a failure is answered
   POP3_AUTH_FAILURE_DELAY after the attempt began (once the penalty is slept off), however
   long its check took, so the hasher of an account (argon2, an imported PBKDF2 or Dovecot
   hash) does not show.
   A stored hash no configured hasher can check (its library missing, its parameters broken or
   costing more than the import allows, ``store.check_password_hash``) is a failure like any
   other, decided without running it, and logged once per account for the operator;
4. LOGIN-DELAY and the maildrop lease (taken through the process's
   :class:`~mailadmin.pop3d.leases.LeaseKeeper`) are checked on the database executor.

A database that cannot be reached (``TRANSIENT_DB_ERRORS``) makes the login a temporary failure,
answered no faster than a wrong password. The penalty look-up of a malformed attempt (``reject``)
fails open: it is logged and only the failure delay is applied, since no password can be
checked, so none guessed, while the database is away.

POP3 clients log in on every poll, so a successful verification is remembered for
POP3_AUTH_CACHE_TTL seconds (Dovecot's auth_cache makes the same trade): a keyed hash of the
password, tied to a fingerprint of the stored password hash. A warm login re-reads the user's
row (active flags, current hash) but skips argon2; a password change, a disabled login or an
expired entry sends it back to a full verification. A login that upgraded an imported hash is
remembered with the argon2 hash it wrote (or, if a password was set meanwhile and the upgrade
was not written, with the old one, which no longer matches). Failures are never cached, and the
penalty is slept off before the cache is consulted. The cost: for up to the TTL, a process
holds, in memory only, enough to recognise a password it has just verified.
"""

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import random
import secrets
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth import authenticate as django_authenticate
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import identify_hasher
from django.db.models import Max
from django.utils import timezone

from mailadmin.addresses import domain_of_login
from mailadmin.executors import TRANSIENT_DB_ERRORS, BoundedExecutor
from mailadmin.hosting import store
from mailadmin.models import AuthFailure, Mailbox, Pop3Session
from mailadmin.pop3d import registry
from mailadmin.pop3d.leases import Lease, LeaseKeeper
from mailadmin.pop3d.maildrop import OrmMaildrop, snapshot
from pop3.mailbox import LoginFailure, LoginRequest, LoginResult, MessageInfo
from pop3.session import log_text

logger = logging.getLogger(__name__)

MAX_USERNAME_LENGTH = 320
PENALTY_INITIAL_SECONDS = 2.0


@dataclass(frozen=True)
class AuthPolicy:
    """The settings of the policy; runpop3 fills them from Django settings, the only defaults."""

    cache_ttl_seconds: float
    failure_delay: float
    penalty_max: float
    penalty_window_seconds: int
    login_delay_seconds: int


@dataclass(frozen=True)
class VerifiedUser:
    mailbox_id: int
    username: str
    password_fingerprint: str


class CredentialCache:
    """Recently verified logins: name -> (keyed password hash, stored-hash fingerprint, expiry)."""

    def __init__(self, ttl_seconds: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: dict[str, tuple[bytes, str, float]] = {}

    def _digest(self, username: str, password: str) -> bytes:
        material = f"{username}\0{password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def lookup(self, username: str, password: str) -> str | None:
        """The fingerprint the password was verified against, if it is still fresh."""
        entry = self._entries.get(username)
        if entry is None:
            return None
        digest, fingerprint, expires = entry
        if time.monotonic() >= expires or not hmac.compare_digest(digest, self._digest(username, password)):
            return None
        return fingerprint

    def remember(self, username: str, password: str, fingerprint: str) -> None:
        if not self.ttl:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))  # the oldest entry
        self._entries[username] = (self._digest(username, password), fingerprint, time.monotonic() + self.ttl)

    def forget(self, username: str) -> None:
        self._entries.pop(username, None)


class _Turns:
    """The attempts of one penalised source in this process: one at a time."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0


class UncheckableHashes:
    """Accounts whose stored hash cannot be checked, each logged once for the operator."""

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # the hashing threads report here

    def report(self, username: str, problem: str) -> None:
        with self._lock:
            if username in self._warned:
                return
            self._warned.add(username)
        logger.warning(
            "the stored password hash of <%s> cannot be checked (%s); its logins fail until the password "
            "is set again",
            log_text(username),
            problem,
        )


class Pop3Authenticator:
    """``pop3.mailbox.Authenticator`` against Django users with an active mailbox."""

    def __init__(
        self, policy: AuthPolicy, *, database: BoundedExecutor, hashing: BoundedExecutor, leases: LeaseKeeper
    ) -> None:
        self.policy = policy
        self.database = database
        self.hashing = hashing
        self.leases = leases
        self.cache = CredentialCache(policy.cache_ttl_seconds)
        self.uncheckable = UncheckableHashes()
        # Seconds of the slowest full password check so far: failures are never answered sooner.
        self._slowest_check = 0.0
        self.clock: Callable[[], float] = time.monotonic
        self._attempt_key = secrets.token_bytes(32)
        self._cleanups: set[asyncio.Future] = set()
        self._turns: dict[str, _Turns] = {}

    async def authenticate(self, request: LoginRequest) -> LoginResult:
        source = penalty_source(request.peer_host)
        try:
            penalty = await self.database.run(penalty_seconds, source, self.policy)
            async with self._one_at_a_time(source, penalised=penalty > 0):
                await asyncio.sleep(penalty)
                began = self.clock()
                username = normalise_login(request.username)
                verified = await self._verify(username, request.password) if username else None
        except TRANSIENT_DB_ERRORS as error:
            return await self._internal_failure("", error)
        if verified is None:
            await self._fail(request, source, "bad credentials", self._attempt(request), began)
            return LoginResult(username=username or "", failure=LoginFailure.BAD_CREDENTIALS)
        lease = self.leases.lease(verified.mailbox_id)
        try:
            failure, rows = await self._open_maildrop(lease)
        except TRANSIENT_DB_ERRORS as error:
            await lease.release()  # taken before the snapshot failed, perhaps
            return await self._internal_failure(verified.username, error)
        if failure is not None:
            await self._record(request, source, failure.value, penalised=False)
            return LoginResult(username=verified.username, failure=failure)
        maildrop = OrmMaildrop(self.database, lease, rows, verified.password_fingerprint)
        return LoginResult(maildrop=maildrop, username=verified.username)

    async def _open_maildrop(self, lease: Lease):
        """open_maildrop on the executor; a session cancelled meanwhile gives the lease back.

        Cancelling the await does not stop the worker thread, which may still take the lease;
        a background task waits for it and releases the lease, so the mailbox is not left
        locked until the lease lapses. ``settle()`` waits for those tasks.
        """
        work = asyncio.ensure_future(self.database.run(open_maildrop, lease, self.policy))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            cleanup = asyncio.ensure_future(self._give_back(work, lease))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            raise

    async def _give_back(self, work: asyncio.Future, lease: Lease) -> None:
        try:
            await work
        except TRANSIENT_DB_ERRORS:
            pass
        await lease.release()

    async def settle(self) -> None:
        """Wait until leases taken for cancelled logins have been given back."""
        while self._cleanups:
            await asyncio.wait(list(self._cleanups))

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, source: str, *, penalised: bool) -> AsyncIterator[None]:
        """A penalised source's attempts take turns in this process; others go straight in."""
        if not penalised:
            yield
            return
        turns = self._turns.setdefault(source, _Turns())
        turns.waiting += 1
        try:
            async with turns.lock:
                yield
        finally:
            turns.waiting -= 1
            if not turns.waiting:
                del self._turns[source]

    async def _verify(self, username: str, password: str) -> "VerifiedUser | None":
        cached = self.cache.lookup(username, password)
        if cached is not None:
            current = await self.database.run(current_user, username)
            if current is not None and current.password_fingerprint == cached:
                return current
            self.cache.forget(username)
        started = self.clock()
        verified = await self.hashing.run(verify_credentials, username, password, self.uncheckable)
        self._slowest_check = max(self._slowest_check, self.clock() - started)
        if verified is not None:
            self.cache.remember(username, password, verified.password_fingerprint)
        return verified

    async def reject(self, session_id: str, peer_host: str, mechanism: str, reason: str) -> None:
        source = penalty_source(peer_host)
        request = LoginRequest("", "", mechanism, peer_host, False, session_id)
        try:
            await asyncio.sleep(await self.database.run(penalty_seconds, source, self.policy))
        except TRANSIENT_DB_ERRORS as error:
            logger.warning("no penalty look-up for %s (%s); only the failure delay applies", peer_host, error)
        await self._fail(request, source, reason, "", self.clock())

    async def _internal_failure(self, username: str, error: Exception) -> LoginResult:
        """[SYS/TEMP], never faster than a wrong password, with jitter against a thundering herd."""
        logger.warning("login of <%s> failed for lack of the database: %s", log_text(username), error)
        await asyncio.sleep(self.policy.failure_delay * (1 + random.random() / 2))
        return LoginResult(username=username, failure=LoginFailure.TEMPORARY)

    async def _fail(
        self, request: LoginRequest, source: str, reason: str, attempt: str, began: float
    ) -> None:
        """Record the failure, then answer it a fixed time after ``began``: the failure delay, or
        the slowest password check this process has run if that took longer (an imported hash
        costlier than the delay), so that no account's hasher shows in the answer's timing."""
        await self._record(request, source, reason, attempt=attempt)
        answer_after = max(self.policy.failure_delay, self._slowest_check)
        await asyncio.sleep(max(0.0, began + answer_after - self.clock()))

    async def _record(self, request: LoginRequest, source: str, reason: str, **fields) -> None:
        try:
            await self.database.run(record_failure, request, source, reason, fields)
        except TRANSIENT_DB_ERRORS:
            logger.warning("could not record a failed login from %s", request.peer_host)

    def _attempt(self, request: LoginRequest) -> str:
        """A keyed hash of the tried credentials: equal attempts match, nothing is recoverable."""
        material = f"{request.username}\0{request.password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._attempt_key, material, hashlib.sha256).hexdigest()[:32]


def normalise_login(username: str) -> str | None:
    """Django's NFKC username normalisation, lower-cased as our login names are; None if unusable."""
    name = unicodedata.normalize("NFKC", username).strip().lower()
    if not name or len(name) > MAX_USERNAME_LENGTH or any(ord(c) < 0x21 or c == "\x7f" for c in name):
        return None
    return name


def penalty_source(peer_host: str) -> str:
    """The penalty groups IPv6 clients by /48, as Dovecot does; IPv4 addresses stand alone."""
    try:
        address = ipaddress.ip_address(peer_host.split("%")[0])
    except ValueError:
        return peer_host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/48", strict=False))
    return str(address)


# --- Sync units, run on the executors --------------------------------------------------------


def penalty_seconds(source: str, policy: AuthPolicy) -> float:
    """2 s after the first recent failure, doubling per distinct failure, capped (Dovecot's)."""
    if not policy.penalty_max:
        return 0.0
    since = timezone.now() - timedelta(seconds=policy.penalty_window_seconds)
    recent = AuthFailure.objects.filter(source=source, created_at__gte=since, penalised=True)
    distinct = (
        recent.exclude(attempt="").values("attempt").distinct().count() + recent.filter(attempt="").count()
    )
    if not distinct:
        return 0.0
    return min(PENALTY_INITIAL_SECONDS * 2 ** (distinct - 1), policy.penalty_max)


def verify_credentials(username: str, password: str, uncheckable: UncheckableHashes) -> VerifiedUser | None:
    """The full check: Django's authenticate (argon2, upgrade on success), then the mailbox.

    A stored hash that cannot be checked (see :func:`hash_problem`), or whose hasher fails on
    it, is a failed login: an account must not answer differently from any other.
    """
    stored = get_user_model().objects.filter(username=username).values_list("password", flat=True).first()
    problem = hash_problem(stored) if stored else None
    if problem is not None:
        uncheckable.report(username, problem)
        return None
    try:
        user = django_authenticate(username=username, password=password)
    except (ValueError, TypeError, OverflowError) as error:
        uncheckable.report(username, f"{type(error).__name__}: {error}")
        return None
    if user is None:
        return None
    mailbox_id = Mailbox.objects.usable().filter(user=user).values_list("pk", flat=True).first()
    if mailbox_id is None:
        return None
    return VerifiedUser(mailbox_id, user.username, registry.password_fingerprint(user.password))


def hash_problem(encoded: str) -> str | None:
    """Why ``encoded`` must not be checked at login, or None when it may be.

    An unusable password (``!...``) or a format no configured hasher knows is left to Django,
    which fails it at no cost. Any other hash gets the import's own check
    (``store.check_password_hash``: a usable hasher, each cost within bounds), so a hash that
    could not be imported is never run at login either.
    """
    try:
        identify_hasher(encoded)
    except ValueError:
        return None
    try:
        store.check_password_hash(encoded)
    except store.InvalidInput as refusal:
        return str(refusal)
    return None


def current_user(username: str) -> VerifiedUser | None:
    """The login as it stands now, if it may log in at all: for checking a cached verification.

    Every warm login asks it, so it goes through the store's SQL built once
    (``store.find_mailbox``) and ``Mailbox.is_usable``: the equivalent queryset spent more of
    runpop3's CPU compiling than the rest of such a login.
    """
    mailbox = store.find_mailbox(username)
    if mailbox is None or not mailbox.is_usable():
        return None
    user = mailbox.user
    return VerifiedUser(mailbox.pk, user.username, registry.password_fingerprint(user.password))


def open_maildrop(lease: Lease, policy: AuthPolicy) -> tuple[LoginFailure | None, Sequence[MessageInfo]]:
    """LOGIN-DELAY, then the lease and the snapshot; in that order."""
    mailbox_id = lease.mailbox_id
    if policy.login_delay_seconds:
        sessions = Pop3Session.objects.filter(mailbox_id=mailbox_id)
        last = sessions.aggregate(last=Max("authenticated_at"))["last"]
        if last and timezone.now() - last < timedelta(seconds=policy.login_delay_seconds):
            return LoginFailure.LOGIN_DELAY, []
    if not lease.acquire():
        return LoginFailure.IN_USE, []
    return None, snapshot(mailbox_id)


def record_failure(request: LoginRequest, source: str, reason: str, fields: dict) -> None:
    AuthFailure.objects.create(
        created_at=timezone.now(),
        session_id=request.session_id or None,
        username=registry.printable(request.username)[:MAX_USERNAME_LENGTH],
        domain_id=registry.domain_named(domain_of_login(request.username)),
        peer_host=request.peer_host[:64],
        source=source,
        mechanism=request.mechanism[:16],
        reason=reason[:64],
        **fields,
    )

"""Argon2 verification that keeps its memory between checks, one buffer per hashing thread.

Django's hasher verifies through argon2-cffi's ``argon2_verify``, in which libargon2 mallocs
``memory_cost`` KiB (100 MiB at Django's defaults) and frees it again for every check: glibc
maps a block that large afresh each time, and the kernel faults in and zeroes its 25,600 pages
before argon2 writes them itself, about 30 % of a verification's CPU. A thread that has called
:func:`keep_memory_in_this_thread` (runpop3's hashing threads) instead runs ``argon2_ctx``
with allocation callbacks (argon2-cffi's low-level API) that hand libargon2 a buffer the thread
keeps between checks, mapped once at the largest size it has needed, up to a bound (private
anonymous memory, in transparent huge pages where the kernel allows them).

Nothing of one check reaches the next through that buffer: libargon2 writes every block before
it reads it (the first pass computes each block from blocks already computed in the same call,
later passes XOR into blocks the first pass wrote), and wipes the whole memory before it hands
it back (``clear_internal_memory``, on by default, runs before the free callback).
``tests/test_argon2_hasher.py`` checks both: a buffer filled with garbage gives the same result,
and it is all zeros after every check.

Only "matches" and "does not match" are decided here. Whatever this module does not parse
canonically (a hash without ``v=``, unusual base64) and any other outcome of libargon2
(parameters out of range, memory above the bound) goes to argon2-cffi's own ``verify``, so a
result never differs from Django's hasher. New hashes are made exactly as Django makes them.

The price is resident memory: each such thread holds its buffer for the life of the process,
``POP3_AUTH_THREADS`` x 100 MiB at Django's defaults (at most :data:`MAX_KEPT_BYTES` each).
"""

import base64
import binascii
import hmac
import mmap
import re
import threading

from argon2.low_level import ffi, lib
from django.contrib.auth import hashers

from mailadmin.hosting.store.accounts import MAX_ARGON2_MEMORY_FACTOR

KIB = 1024
# The largest buffer a thread keeps: the memory of the costliest argon2 hash a login may run
# (store.check_password_hash refuses more). A check that needs more allocates as argon2-cffi does.
MAX_KEPT_BYTES = MAX_ARGON2_MEMORY_FACTOR * hashers.Argon2PasswordHasher.memory_cost * KIB
MAX_UINT32 = 2**32 - 1

_TYPES = {"argon2d": lib.Argon2_d, "argon2i": lib.Argon2_i, "argon2id": lib.Argon2_id}
_ENCODED = re.compile(
    r"\$(?P<variety>argon2id|argon2i|argon2d)\$v=(?P<version>[0-9]+)"
    r"\$m=(?P<memory>[0-9]+),t=(?P<time>[0-9]+),p=(?P<lanes>[0-9]+)"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<hash>[A-Za-z0-9+/]+)"
)


class KeptMemory:
    """One thread's argon2 buffer; ``maps`` counts the buffers mapped, ``decided`` the checks run in them."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.maps = 0
        self.decided = 0
        self._buffer: mmap.mmap | None = None
        self._pointer = ffi.NULL

    def pointer_for(self, size: int):
        """Where libargon2 may use ``size`` bytes, or NULL above the limit (it then fails cleanly)."""
        if size > self.limit_bytes:
            return ffi.NULL
        if self._buffer is None or len(self._buffer) < size:
            self.release()
            self._buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            # argon2 reads its blocks all over the buffer: 2 MiB pages spare it most TLB misses
            # (about a tenth of a check's CPU here), where the kernel allows them (THP "madvise").
            self._buffer.madvise(mmap.MADV_HUGEPAGE)
            self._pointer = ffi.from_buffer("uint8_t[]", self._buffer)
            self.maps += 1
        return self._pointer

    @property
    def buffer(self) -> mmap.mmap | None:
        return self._buffer

    def release(self) -> None:
        if self._buffer is not None:
            ffi.release(self._pointer)
            self._buffer.close()
            self._buffer, self._pointer = None, ffi.NULL


_threads = threading.local()


def keep_memory_in_this_thread(limit_bytes: int = MAX_KEPT_BYTES) -> KeptMemory:
    """From now on this thread's argon2 checks reuse one buffer of up to ``limit_bytes``."""
    _threads.kept = KeptMemory(limit_bytes)
    return _threads.kept


def kept_memory() -> KeptMemory | None:
    return getattr(_threads, "kept", None)


def verify_in_kept_memory(encoded: str, password: bytes) -> bool | None:
    """Does ``password`` match argon2-cffi's ``encoded`` hash, checked in this thread's kept
    memory? None when the thread keeps none or argon2-cffi is to decide (see the module's doc)."""
    kept = kept_memory()
    parsed = _parse(encoded) if kept is not None else None
    if parsed is None:
        return None
    variety, (version, memory, time, lanes), salt, expected = parsed
    # The context holds bare pointers: these owners must live until argon2_ctx returns.
    out, secret, salt_bytes = (ffi.new("uint8_t[]", init) for init in (len(expected), password, salt))
    context = ffi.new(
        "argon2_context *",
        {
            "out": out,
            "outlen": len(expected),
            "pwd": secret,
            "pwdlen": len(password),
            "salt": salt_bytes,
            "saltlen": len(salt),
            "t_cost": time,
            "m_cost": memory,
            "lanes": lanes,
            "threads": lanes,  # as argon2_verify runs it
            "version": version,
            "allocate_cbk": _allocate,
            "free_cbk": _keep,
            "flags": lib.ARGON2_DEFAULT_FLAGS,
        },
    )
    if lib.argon2_ctx(context, _TYPES[variety]) != lib.ARGON2_OK:
        return None
    kept.decided += 1
    return hmac.compare_digest(ffi.buffer(out)[:], expected)


@ffi.callback("int(uint8_t **, size_t)")
def _allocate(memory, size):
    memory[0] = _threads.kept.pointer_for(size)
    return lib.ARGON2_OK  # libargon2 reads a NULL pointer as its allocation error


@ffi.callback("void(uint8_t *, size_t)")
def _keep(memory, size):
    """libargon2 has wiped the memory; the thread keeps it for its next check."""


def _parse(encoded: str) -> tuple[str, tuple[int, int, int, int], bytes, bytes] | None:
    """(variety, (version, m, t, p), salt, hash) of a canonically encoded hash, else None."""
    match = _ENCODED.fullmatch(encoded)
    if match is None:
        return None
    numbers = tuple(int(match[name]) for name in ("version", "memory", "time", "lanes"))
    try:
        salt, expected = (_padded_decode(match[name]) for name in ("salt", "hash"))
    except binascii.Error:
        return None
    canonical = "${}$v={}$m={},t={},p={}${}${}".format(
        match["variety"], *numbers, _unpadded(salt), _unpadded(expected)
    )
    if canonical != encoded or max(numbers) > MAX_UINT32:
        return None
    return match["variety"], numbers, salt, expected


def _padded_decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _unpadded(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


class Argon2PasswordHasher(hashers.Argon2PasswordHasher):
    """Django's argon2 hasher; in a thread that keeps its memory, checks run in that memory."""

    def verify(self, password, encoded):
        algorithm, rest = encoded.split("$", 1)
        assert algorithm == self.algorithm
        secret = password if isinstance(password, bytes) else password.encode()
        matches = verify_in_kept_memory("$" + rest, secret)
        return super().verify(password, encoded) if matches is None else matches

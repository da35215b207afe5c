"""Django's ModelBackend, except that upgrading a password hash cannot undo a password change.

A login whose stored hash is not today's (an imported Dovecot or PBKDF2 hash, argon2 with old
parameters) has it replaced once the password checks out. Django's own upgrade saves the new
hash unconditionally, ~100 ms (one argon2 hash) after reading the old one; a password set
meanwhile by another process (the admin, ``setpassword``, the API) would be overwritten with a
hash of the old password. Here the upgrade is one conditional UPDATE
(``store.upgrade_password_hash``): applied only while the old hash is still stored.
"""

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.hashers import check_password, make_password

from mailadmin.hosting import store


class HashUpgradingBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        user_model = get_user_model()
        username = kwargs.get(user_model.USERNAME_FIELD) if username is None else username
        if username is None or password is None:
            return None
        user = user_model._default_manager.filter(**{user_model.USERNAME_FIELD: username}).first()
        if user is None:
            # Hash once anyway, so an unknown login costs what a known one does (as Django does).
            user_model().set_password(password)
            return None

        def upgrade(raw_password: str) -> None:
            upgraded = make_password(raw_password)
            if store.upgrade_password_hash(user.pk, user.password, upgraded):
                user.password = upgraded

        if check_password(password, user.password, upgrade) and self.user_can_authenticate(user):
            return user
        return None

    async def aauthenticate(self, request, username=None, password=None, **kwargs):
        return await sync_to_async(self.authenticate)(request, username, password, **kwargs)

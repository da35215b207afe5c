"""``python -m bench.staff_session``: a signed-in admin session for the bench's websocket client.

Prints the session key of a superuser's session (made in the bench database), which the
client sends as the ``sessionid`` cookie, as a browser that logged in would.
"""

import django


def main() -> None:
    django.setup()
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    users = get_user_model().objects
    user = users.filter(username="bench-console").first()
    if user is None:
        user = users.create_superuser("bench-console", "bench@example.test", None)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    # The backend a login through the form would record: one the settings name.
    session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    print(session.session_key)


if __name__ == "__main__":
    main()

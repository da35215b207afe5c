"""The console's pages, each wrapped in the admin's ``admin_view`` (staff login, CSRF, no cache)."""


def console_urls(site) -> list:
    return []
